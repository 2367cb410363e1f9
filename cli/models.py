"""Where the registry verbs (`pull`, `list`, `show`, `rm`, `cp`, `create`) act: through a running
daemon's API when one answers, as Ollama's CLI does, so the daemon learns of every change and
the CLI need not share its `MYLLM_HOME`; on the registry directly when none runs.

Both sides give the verbs the same plain values (`Facts` dicts, `Pulled`), so each verb renders
one way whichever did the work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from myllm.pull.progress import PullProgress
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.settings import Settings

Facts = dict[str, Any]
"""One model as the verbs print it: the keys of `facts_of`, and `problem` (None when it is fine)."""


@dataclass(frozen=True)
class Pulled:
    name: str
    digest: str
    source: str
    note: str | None = None


class ModelStore(Protocol):
    def list(self) -> list[Facts]: ...
    def show(self, name: str) -> Facts: ...
    def pull(self, source: str, name: str | None, progress: PullProgress) -> Pulled: ...
    def remove(self, name: str) -> None: ...
    def copy(self, source: str, destination: str) -> str: ...
    def create(self, name: str, modelfile: str, base_dir: Path) -> Facts: ...


def facts_of(row: ModelRow, problem: str | None = None) -> Facts:
    return {
        "name": row.name, "digest": row.digest, "size": row.size, "architecture": row.architecture,
        "family": row.family, "parameter_count": row.parameter_count, "parameter_size": row.parameter_size,
        "quantization": row.quantization, "context_length": row.context_length,
        "embedding_length": row.embedding_length, "vocab_size": row.vocab_size, "license": row.license,
        "source": row.source, "parameters": row.parameters, "system": row.system, "template": row.template,
        "created_at": row.created_at.isoformat(), "modified_at": row.modified_at.isoformat(), "problem": problem,
        "vision": row.vision, "projector_digest": row.projector_digest, "projector_size": row.projector_size,
        "kind": row.kind, "adapters": [{"digest": a["digest"], "size": a["size"]} for a in row.adapters or ()],
        "draft_digest": row.draft_digest, "draft_size": row.draft_size,
    }


class LocalStore:
    """The registry itself (no daemon running)."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    def list(self) -> list[Facts]:
        return [facts_of(row, self.registry.problem(row)) for row in self.registry.list()]

    def show(self, name: str) -> Facts:
        return facts_of(self.registry.get(name))

    def pull(self, source: str, name: str | None, progress: PullProgress) -> Pulled:
        from myllm.pull import pull

        result = pull(self.registry, self.settings, source, name=name, progress=progress)
        return Pulled(result.model.name, result.model.digest, result.source, result.note)

    def remove(self, name: str) -> None:
        self.registry.remove(name)

    def copy(self, source: str, destination: str) -> str:
        return self.registry.copy(source, destination).name

    def create(self, name: str, modelfile: str, base_dir: Path) -> Facts:
        from myllm.create import create_model

        return facts_of(create_model(self.registry, self.settings, name, modelfile, base_dir))


class DaemonError(Exception):
    """What the daemon answered, as one line."""


class DaemonStore:
    """A running daemon: reads from its native API, writes through its Ollama API."""

    def __init__(self, native: httpx.Client, ollama: httpx.Client) -> None:
        self.native = native
        self.ollama = ollama

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.is_success:
            return response.json() if response.content else None
        try:
            body = response.json()
            message = body.get("detail") or body.get("error")
        except ValueError:
            message = None
        raise DaemonError(message or f"the daemon answered {response.status_code}")

    def list(self) -> list[Facts]:
        models = self._json(self.native.get("/api/models"))["models"]
        return [{**m, "context_length": m["context_size"]} for m in models]

    def show(self, name: str) -> Facts:
        m = self._json(self.native.get(f"/api/models/{name}"))
        return {**m, "context_length": m["context_size"], "template": m["chat_template"]}

    def _statuses(self, path: str, body: dict[str, Any], progress: PullProgress | None = None) -> dict[str, Any]:
        """An NDJSON status stream to its `success` (returned); an `error` line is the daemon's refusal."""
        with self.ollama.stream("POST", path, json={**body, "stream": True}) as response:
            if not response.is_success:
                response.read()
                self._json(response)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                status = json.loads(line)
                if "error" in status:
                    raise DaemonError(status["error"])
                if status.get("status") == "success":
                    return status
                if progress is not None:
                    progress(status["status"].split(" sha256:")[0], status.get("completed", 0), status.get("total"))
        raise DaemonError("the daemon's answer ended before it said 'success'")

    def pull(self, source: str, name: str | None, progress: PullProgress) -> Pulled:
        """A file on this machine is uploaded as a blob and named by `create` (the daemon reads
        no client's paths unless MYLLM_MODEL_DIRS says so); anything else the daemon pulls."""
        from myllm.pull.sources import FileSource, default_name, parse_source

        parsed = parse_source(source)
        if isinstance(parsed, FileSource) and parsed.path.expanduser().is_file():
            path = parsed.path.expanduser()
            progress("uploading", 0, path.stat().st_size)
            digest = self._upload(path)
            progress("uploading", path.stat().st_size, path.stat().st_size)
            target = name or default_name(parsed)
            self._statuses("/api/create", {"model": target, "files": {path.name: digest}})
            shown = self.show(target)
            return Pulled(shown["name"], shown["digest"], str(path))
        done = self._statuses("/api/pull", {"model": source, **({"register_as": name} if name else {})}, progress)
        pulled = self.show(done.get("model") or name or source)  # `model`: the name it was registered under (extension)
        return Pulled(pulled["name"], pulled["digest"], pulled.get("source") or source)

    def remove(self, name: str) -> None:
        self._json(self.ollama.request("DELETE", "/api/delete", json={"model": name}))

    def copy(self, source: str, destination: str) -> str:
        self._json(self.ollama.post("/api/copy", json={"source": source, "destination": destination}))
        return str(self.show(destination)["name"])

    def create(self, name: str, modelfile: str, base_dir: Path) -> Facts:
        """The Modelfile is read here, as Ollama's CLI reads it: a FROM file (a model, or its
        projector) and each ADAPTER file is uploaded as a blob (the daemon may not see this machine's files), then
        `create` names it."""
        from myllm.modelfile import parse

        mf = parse(modelfile)
        body: dict[str, Any] = {"model": name}
        files: dict[str, str] = {}
        for value in (mf.base, *([mf.projector] if mf.projector else [])):  # the daemon tells which is which
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if path.is_file():
                files[path.name] = self._upload(path)
            else:
                body["from"] = value
        if files:
            body["files"] = files
        adapters = [base_dir / Path(value).expanduser() for value in mf.adapters]  # an absolute path stays itself
        if missing := [str(path) for path in adapters if not path.is_file()]:
            raise DaemonError(f"ADAPTER {missing[0]} is no file")
        if adapters:
            body["adapters"] = {path.name: self._upload(path) for path in adapters}
        for key, value in (("template", mf.template), ("system", mf.system), ("license", mf.license),
                           ("draft", mf.draft)):
            if value is not None:
                body[key] = value
        if mf.parameters:
            body["parameters"] = mf.parameters
        if mf.messages:
            body["messages"] = mf.messages
        self._statuses("/api/create", body)
        return self.show(name)

    def _upload(self, path: Path) -> str:
        digest = "sha256:" + _sha256(path)
        if self.ollama.head(f"/api/blobs/{digest}").status_code != 200:
            with path.open("rb") as f:
                self._json(self.ollama.post(f"/api/blobs/{digest}", content=iter(lambda: f.read(1 << 20), b"")))
        return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def model_store(settings: Settings | None = None) -> Iterator[ModelStore]:
    """The daemon's API when `myllm serve` answers at MYLLM_HOST:MYLLM_PORT with its Ollama
    port on; the registry otherwise."""
    settings = settings or Settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    key = settings.api_keys.get_secret_value().split(",")[0].strip() if settings.api_keys else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(10, read=None)
    native = httpx.Client(base_url=f"http://{host}:{settings.port}", timeout=timeout, headers=headers)
    try:
        info = native.get("/", timeout=2).json()
        running = info.get("name") == "MyLLM" and info.get("ollama_port")
    except (httpx.HTTPError, ValueError, AttributeError):
        running = False
    if running:
        try:
            with httpx.Client(base_url=f"http://{host}:{info['ollama_port']}", timeout=timeout, headers=headers) as ollama:
                yield DaemonStore(native, ollama)
        finally:
            native.close()
        return
    native.close()
    registry = Registry.open(settings)
    try:
        yield LocalStore(registry, settings)
    finally:
        registry.close()
