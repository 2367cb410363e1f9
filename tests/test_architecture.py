"""The shape docs/ARCHITECTURE.md describes, checked on the source: who may import whom (no
import runs back up a layer), no circular imports, nothing in `api/` above the protocol folders
but the app, the server and the shared state, no protocol folder importing another, no stream
loop outside the relay, and no class over 350 lines.

A module in a place the table below does not know fails the first test: a new place is a
decision, written here and in ARCHITECTURE.md's table at once."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("myllm", "cli")

BASE = {"myllm.settings", "myllm.errors"}
RUNTIME_SHARED = {"myllm.runtime.engine_types", "myllm.runtime.request", "myllm.runtime.devices"}
DAEMON_RUNTIME = {"myllm.runtime.service", "myllm.runtime.placement", "myllm.runtime.request",
                  "myllm.runtime.instance", "myllm.runtime.engine_types", "myllm.runtime.hooks"}
PROTOCOL_MAY_USE = BASE | DAEMON_RUNTIME | {
    "myllm", "myllm.registry", "myllm.pull", "myllm.modelfile", "myllm.api.http", "myllm.api.state"}

ALLOWED: dict[str, set[str]] = {
    "myllm": {"myllm.optimized"},  # the package root: its version, and OptimizedLLM imported lazily
    "myllm.settings": {"myllm.errors"},
    "myllm.errors": set(),
    "myllm.pools": BASE,
    "myllm.registry": BASE | {"myllm.pools"},
    "myllm.pull": BASE | {"myllm.registry"},
    # Inside the runtime, from a request down: preparing it, the types both sides of the runner
    # boundary share, choosing and holding a model, crossing into the runner, the engines in it.
    "myllm.runtime.request": BASE | {"myllm.pools", "myllm.registry", "myllm.runtime.instance", "myllm.runtime.engine_types"},
    # Both sides of the runner boundary import engine_types, so it holds plain data: the registry's
    # row only for type checking, and no request options (pydantic) at all.
    "myllm.runtime.engine_types": BASE | {"myllm.registry"},
    "myllm.runtime.devices": set(),
    "myllm.runtime.instance": BASE | {"myllm.runtime.engine_types", "myllm.runtime.request"},
    "myllm.runtime.hooks": {"myllm.runtime.engine_types"},
    "myllm.runtime.engine": BASE | {"myllm.runtime.engine_types", "myllm.runtime.devices"},
    "myllm.runtime.runner": BASE | RUNTIME_SHARED | {
        "myllm", "myllm.runtime.engine", "myllm.runtime.instance"},
    "myllm.runtime.placement": BASE | RUNTIME_SHARED | {
        "myllm.registry", "myllm.runtime.hooks", "myllm.runtime.instance", "myllm.runtime.runner"},
    "myllm.runtime.service": BASE | RUNTIME_SHARED | {
        "myllm.registry", "myllm.runtime.instance", "myllm.runtime.placement", "myllm.runtime.runner"},
    "myllm.modelfile": BASE | {"myllm.registry", "myllm.runtime.request"},
    "myllm.create": BASE | {"myllm.registry", "myllm.pull", "myllm.modelfile"},
    "myllm.optimized": BASE | RUNTIME_SHARED | {
        "myllm.registry", "myllm.pull", "myllm.runtime.engine", "myllm.runtime.placement"},
    # The HTTP edge: a floor every API shares, one folder per API document on it, and the app.
    "myllm.api.state": BASE | DAEMON_RUNTIME | {"myllm.pools", "myllm.registry"},
    "myllm.api.http": BASE | DAEMON_RUNTIME | {"myllm.pools", "myllm.registry", "myllm.pull", "myllm.api.state"},
    **{f"myllm.api.{api}": PROTOCOL_MAY_USE for api in (
        "openai", "anthropic", "ollama", "native", "deepshiva_llm_service", "llama_server", "rerank", "ui")},
    "myllm.api.app": PROTOCOL_MAY_USE | {f"myllm.api.{api}" for api in (
        "openai", "anthropic", "ollama", "native", "deepshiva_llm_service", "llama_server", "rerank", "ui")},
    "myllm.api.server": BASE | {"myllm.api.app"},
    "cli": BASE | {"myllm", "myllm.registry", "myllm.pull", "myllm.modelfile", "myllm.create",
                   "myllm.runtime.request", "myllm.api.server"},
}
"""Each place and the places it may import (besides itself)."""

API_TOP = {"__init__.py", "app.py", "server.py", "state.py"}


def place(module: str) -> str:
    """The entry of ALLOWED a module belongs to: the longest one that is a prefix of it."""
    if module.split(".")[0] == "cli":
        return "cli"
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in ALLOWED:
            return ".".join(parts[:n])
    return module


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


KNOWN = {name for name, _ in modules()}


def resolved(name: str) -> str:
    """The module an imported name lives in (`from a.b import c` names module a.b.c or a name in a.b)."""
    while name not in KNOWN and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path, top_level_only: bool) -> Iterator[str]:
    """Our modules `path` imports; with `top_level_only`, those imported when it is (not inside a
    function, nor under `if TYPE_CHECKING:`), which are the ones that can form a cycle."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST]
    if top_level_only:
        nodes = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    else:
        nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = resolved(f"{node.module}.{alias.name}")
                if target.split(".")[0] in PACKAGES:
                    yield target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield resolved(alias.name)


def test_every_import_goes_to_a_place_its_layer_may_use() -> None:
    unknown = sorted({place(m) for m, _ in modules()} - ALLOWED.keys())
    assert not unknown, f"modules in no known place (add them to ALLOWED and ARCHITECTURE.md): {unknown}"
    wrong = sorted(
        f"{module} imports {target}"
        for module, path in modules()
        for target in imports(path, top_level_only=False)
        if place(target) != place(module) and place(target) not in ALLOWED[place(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_no_circular_imports() -> None:
    graph = {module: set(imports(path, top_level_only=True)) - {module} for module, path in modules()}
    # Tarjan's strongly connected components; any with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_api_holds_only_the_app_the_server_and_the_state_above_its_folders() -> None:
    api = ROOT / "myllm" / "api"
    files = {p.name for p in api.glob("*.py")}
    assert files == API_TOP, files - API_TOP
    folders = {p.name for p in api.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {"http"} | {name.rsplit(".", 1)[1] for name in ALLOWED if name.startswith("myllm.api.")} - {
        "app", "server", "state", "http"}, folders


def test_no_class_is_over_350_lines() -> None:
    long = sorted(
        f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for _, path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 350  # type: ignore[operator]
    )
    assert not long, long


def test_the_stream_relay_is_the_only_loop_over_a_generation() -> None:
    """Protocol folders map shapes; consuming the runtime's events (telling a TokenEvent from a
    DoneEvent) happens in http/relay.py alone. Other async loops (a pull's progress) may stay."""
    events = {"TokenEvent", "DoneEvent"}
    loops = []
    for module, path in modules():
        if not module.startswith("myllm.api.") or module == "myllm.api.http.relay":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AsyncFor) and any(
                    isinstance(n, ast.Name) and n.id in events for part in node.body for n in ast.walk(part)):
                loops.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not loops, loops
