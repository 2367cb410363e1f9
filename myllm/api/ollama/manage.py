"""Ollama's model-management routes (docs/api.md) on the Ollama listener: tags, show, ps, copy,
delete, pull, create and blobs. Like every adapter they only translate, to the registry, the
runtime and `pull` and back to Ollama's shapes. Errors are `{"error": "..."}` with a status
(`ollama_renderer`); an error after a stream started is its last NDJSON line, as in Ollama.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from jinja2 import TemplateSyntaxError

from myllm.api.http.auth import require_admin
from myllm.api.http.progress import ProgressWork
from myllm.api.ollama.inference import answer
from myllm.api.ollama.manage_models import CopyRequest, CreateRequest, ModelRequest, PullRequest
from myllm.api.state import Services, services
from myllm.errors import BlobNotFound, InvalidOptions
from myllm.modelfile import Modelfile, render
from myllm.pull import pull
from myllm.registry.adapter_check import check_adapter
from myllm.registry.blobs import parse_digest
from myllm.registry.chat_templates import Deadline, check_template
from myllm.registry.drafts import draft_columns
from myllm.registry.gguf_meta import read_gguf_kv
from myllm.registry.projector_check import is_projector
from myllm.registry.schema import ModelRow
from myllm.registry.store import Overrides, Projector
from myllm.runtime.placement.report import LoadedInfo, per_model
from myllm.runtime.request.options import PARAMETERS, stored_parameter
from myllm.runtime.request.template import thinks

log = logging.getLogger(__name__)
router = APIRouter()

UNLIMITED_PATHS = ("/api/blobs/",)
"""Blob uploads stream to disk as they come, never into memory, so MYLLM_MAX_BODY does not
limit them (`BodyLimitMiddleware(unlimited=...)`)."""
FOREVER = datetime.max.replace(tzinfo=timezone.utc)
"""`expires_at` of a model kept loaded for good: Ollama's clients show a date this far off as
"Forever" (its own server gives one ~290 years off)."""
_STAGE_STATUS = {
    "assembling": "assembling the model file",
    "verifying": "verifying sha256 digest",
    "checking": "reading model metadata",
}
"""`pull`'s stages that move no bytes, as a status line each (the ones that do are bars)."""


# -- listing and describing -------------------------------------------------------------------


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    """Each model with its `capabilities`, as current Ollama lists them (what `/api/show` gives)."""
    rows = await services(request).pools.db.run(services(request).registry.list)
    return {"models": [
        {"name": r.name, "model": r.name, "modified_at": _utc(r.modified_at), "size": r.size, "digest": r.digest,
         "details": _details(r), "capabilities": _capabilities(r)}
        for r in rows
    ]}


@router.post("/api/show")
async def show(body: ModelRequest, request: Request) -> dict[str, Any]:
    """Empty fields are left out, as Ollama's JSON leaves them out; `model_info` never is (the
    official Python client requires it). `projector_info`: a vision model's projector's GGUF
    keys (`clip.*`), as Ollama shows them."""
    svc = services(request)
    row = await svc.runtime.model(body.model)
    path = await svc.pools.blobs.run(svc.registry.blob_file, row)
    gguf = await svc.pools.blobs.run(_gguf_kv, row.digest, str(path))
    projector = svc.registry.projector_file(row)  # checked with the model's blob by `blob_file`
    clip = None if projector is None else await svc.pools.blobs.run(_gguf_kv, projector.name, str(projector))
    answer = {
        "modelfile": _modelfile(row),
        "parameters": _parameter_lines(row.parameters or {}),
        "template": row.template,
        "system": row.system,
        "license": row.license,
        "messages": row.messages,
        "details": _details(row),
        "model_info": _model_info(row, gguf),
        "projector_info": dict(sorted(clip.items())) if clip is not None else None,
        "capabilities": _capabilities(row),
        "modified_at": _utc(row.modified_at),
    }
    return {key: value for key, value in answer.items() if value or key == "model_info"}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    """One row per model, as Ollama lists them, however many instances it has (`per_model`). The
    base that models with LoRA adapters share is listed under its blob's name (`load_name`),
    with the details of a model over that blob."""
    svc = services(request)
    loaded = per_model(svc.runtime.loaded())
    rows = {r.name: r for r in await svc.pools.db.run(svc.registry.list)} if loaded else {}
    rows.update({f"sha256-{r.digest[:12]}": r for r in list(rows.values()) if r.adapters})
    stats = await asyncio.gather(*(svc.runtime.runner_stats(m.name) for m in loaded), return_exceptions=True)
    return {"models": [{**_running(m, rows[m.name]), **_drafts(figures)}
                       for m, figures in zip(loaded, stats, strict=True) if m.name in rows]}


def _drafts(figures: object) -> dict[str, int]:
    """Extension: what speculative decoding drafted and what stood, every request since the
    model loaded (left out when it drafted nothing, or its runner did not answer)."""
    if not isinstance(figures, dict) or not figures.get("drafted"):
        return {}
    return {"draft_count": figures["drafted"], "draft_accepted_count": figures.get("draft_accepted", 0)}


def _details(row: ModelRow) -> dict[str, Any]:
    """Ollama's `details`. `parent_model` is always empty: the registry keeps no parent."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": row.family,
        "families": [row.family],
        "parameter_size": row.parameter_size,
        "quantization_level": row.quantization,
    }


def _running(info: LoadedInfo, row: ModelRow) -> dict[str, Any]:
    """A loaded model; `size` is its estimated memory (weights, KV cache, buffers), `size_vram`
    the part of it on the GPU (Ollama's CLI prints the split as its PROCESSOR column)."""
    return {
        "name": info.name,
        "model": info.name,
        "size": info.size_estimate,
        "size_vram": info.size_vram,
        "digest": info.digest,
        "details": _details(row),
        "expires_at": info.expires_at or FOREVER,
        "context_length": info.context_length,
    }


def _modelfile(row: ModelRow) -> str:
    """What `myllm create -f` (or Ollama's `create`) takes back to make the same model. Ollama
    puts its blob's path in FROM; here it is the model's name (which `create` builds on just
    the same), so no answer says where the daemon keeps its files."""
    return f"# Modelfile of {row.name}\n\n" + render(Modelfile(
        base=row.name,
        parameters=row.parameters or {},
        template=row.template,
        system=row.system,
        messages=list(row.messages or []),
        license=row.license,
    ))


def _parameter_lines(parameters: dict[str, Any]) -> str:
    """Ollama's `parameters`: a line per value (a list gives one per item), the name padded
    to 30 columns, the value as JSON."""
    return "\n".join(
        f"{name:<30} {json.dumps(item)}"
        for name, value in parameters.items()
        for item in (value if isinstance(value, list) else [value])
    )


@lru_cache(maxsize=64)
def _gguf_kv(digest: str, path: str) -> Mapping[str, Any]:
    """A blob's GGUF metadata, read once per digest (a blob never changes)."""
    return MappingProxyType(read_gguf_kv(Path(path)))


def _model_info(row: ModelRow, gguf: Mapping[str, Any]) -> dict[str, Any]:
    """The GGUF's own keys, sorted, as Ollama shows them: the parameter count it computes
    added, the name and chat template (shown as `template`) left out, arrays null."""
    info = {key: value for key, value in gguf.items() if key not in ("general.name", "tokenizer.chat_template")}
    info["general.parameter_count"] = row.parameter_count
    return dict(sorted(info.items()))


def _capabilities(row: ModelRow) -> list[str]:
    """What the model can do here, in Ollama's words. An embedding model (its kind, from its
    GGUF: registry/gguf_meta.py) only embeds; a reranker only ranks (`rerank`, which Ollama has
    no word for); a chat model also embeds (the runtime mean-pools it). Every model that
    completes takes tools (the runtime describes them to a template that does not render them,
    runtime/request/tools.py); `thinking` follows the chat template; `vision` a projector (as in
    Ollama). Never `insert`: the runtime takes no suffix."""
    if row.kind == "embedding":
        return ["embedding"]
    if row.kind == "reranking":
        return ["rerank"]
    return ["completion", "embedding", "tools", *(["thinking"] if thinks(row.template) else []),
            *(["vision"] if row.vision else [])]


def _utc(moment: datetime) -> datetime:
    """The registry writes UTC; SQLite hands it back without a zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# -- copying and deleting -------------------------------------------------------------------


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request) -> Response:
    """As in Ollama, an existing destination is replaced."""
    require_admin(request, "copying a model")
    svc = services(request)
    await svc.pools.blobs.run(svc.registry.copy, body.source, body.destination, replace=True)
    return Response()


@router.delete("/api/delete")
async def delete(body: ModelRequest, request: Request) -> Response:
    """A loaded model is unloaded first; requests still running on it end with an error."""
    require_admin(request, "deleting a model")
    svc = services(request)
    row = await svc.runtime.model(body.model)
    if svc.runtime.is_loaded(row.name):
        await svc.runtime.unload(row.name)
    await svc.pools.blobs.run(svc.registry.remove, row.name)
    return Response()


# -- pulling and creating ------------------------------------------------------------------


@router.post("/api/pull")
async def pull_model(body: PullRequest, request: Request) -> Response:
    """Whatever `myllm pull` takes (a catalog name, owner/repo[:QUANT], a .gguf path on this
    machine, pkg:NAME), under the name `myllm pull` gives it."""
    require_admin(request, "pulling a model")
    return await answer(_pull_events(services(request), body.model, body.register_as), body.stream)


async def _pull_events(svc: Services, spec: str, name: str | None) -> AsyncIterator[dict[str, Any]]:
    """Ollama's pull statuses over `pull`'s stages. The source is found before any bytes
    move, so an unknown one fails before the first object: an error status, not a line.
    `success` also names the model it registered (an extension the CLI reads)."""
    work = ProgressWork(lambda progress: pull(svc.registry, svc.settings, spec, name=name, progress=progress,
                                              local_dirs=svc.settings.local_model_dirs), svc.pools.pulls)
    updates = work.updates()
    update = await anext(updates, None)
    yield {"status": "pulling manifest"}
    previous = None
    while update is not None:
        line = _pull_line(spec, *update)
        if line != previous:
            yield line
        previous, update = line, await anext(updates, None)
    result = await work.result()
    if result.note:  # e.g. the hub could not be reached and a package was used
        yield {"status": result.note}
    yield {"status": "success", "model": result.model.name}


def _pull_line(spec: str, stage: str, done: int, total: int | None) -> dict[str, Any]:
    """One `pull` update as Ollama's progress object. Moving bytes are a bar, which clients
    key by `digest`; the blob's digest is known only once its bytes are hashed, so the key is
    the model asked for."""
    if stage not in ("downloading", "copying"):
        return {"status": _STAGE_STATUS.get(stage, stage)}
    line: dict[str, Any] = {"status": f"pulling {spec}", "digest": spec, "completed": done}
    if total is not None:
        line["total"] = total
    return line


@router.post("/api/create")
async def create(body: CreateRequest, request: Request) -> Response:
    """A new model `from` a registered one, or from uploaded GGUF blobs (`files`: the model, and
    its projector as a second file, told apart by their architecture as Ollama does), with the
    request's Modelfile settings; an existing model of that name is replaced. The row and
    its settings are written in one transaction (`Registry.copy` / `register_blob`). Extension:
    `from` with `files` naming a projector alone gives the model that projector (a Modelfile's
    FROM of a model name and FROM of a projector file, as `myllm create` sends it)."""
    require_admin(request, "creating a model")
    svc = services(request)
    overrides = _overrides(body)
    uploads = _uploaded_digests(body)
    if body.template is not None:  # a template that loops or explodes is refused here, not at a chat
        await svc.runtime.prepare.run(lambda deadline: _check_template(body.template or "", deadline))
    return await answer(_create_events(svc, body, overrides, uploads), body.stream)


async def _create_events(
    svc: Services, body: CreateRequest, overrides: Overrides, uploads: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    model, projector = await svc.pools.blobs.run(_model_and_projector, svc, uploads, body.from_ is not None)
    if body.adapters:
        overrides = replace(overrides, adapters=await svc.pools.blobs.run(_checked_adapters, svc, body, model))
    if body.draft is not None:
        overrides = replace(overrides, draft=await svc.pools.blobs.run(_draft, svc, body, model))
    if model is None:
        row = await svc.pools.blobs.run(lambda: svc.registry.copy(str(body.from_), body.model, overrides, replace=True,
                                                                  projector=projector))
    else:
        row = await svc.pools.blobs.run(svc.registry.register_blob, body.model, model[1], f"upload:{model[0]}",
                                        overrides, projector)
    for digest in (row.digest, *([row.projector_digest] if row.projector_digest else []),
                   *(a["digest"] for a in row.adapters or ())):
        yield {"status": f"using existing layer sha256:{digest}"}
    yield {"status": "writing manifest"}
    yield {"status": "success"}


def _checked_adapters(svc: Services, body: CreateRequest, model: tuple[str, str] | None) -> list[dict[str, Any]]:
    """Ollama's `adapters` (file name: digest of an uploaded blob), each checked as a LoRA adapter
    of the model being created (`check_adapter`), in the order given."""
    base, base_name = _base_file(svc, body, model)
    adapters = []
    for name, digest in (body.adapters or {}).items():
        path = svc.registry.blobs.path(parse_digest(digest))
        if not path.is_file():
            raise BlobNotFound(f"adapter {name!r}: blob {digest} not found (upload it to /api/blobs first)")
        check_adapter(path, f"upload:{name}", base, base_name)
        adapters.append({"digest": parse_digest(digest), "size": path.stat().st_size})
    return adapters


def _uploaded_digests(body: CreateRequest) -> dict[str, str]:
    """The uploaded files to create from (file name: hex digest)."""
    if body.quantize:
        raise InvalidOptions("'quantize' is not supported: myllm does not quantize models", field="quantize")
    if body.from_ is None and body.files is None:
        raise InvalidOptions("give either 'from' (a model) or 'files' (an uploaded GGUF blob)", field="from")
    if body.files is not None and not 1 <= len(body.files) <= 2:
        raise InvalidOptions(_FILES_SHAPE, field="files")
    return {name: parse_digest(digest) for name, digest in (body.files or {}).items()}


_FILES_SHAPE = ("""'files' must name one GGUF model, and its projector as a second file if it has one: """
                """{"model.gguf": "sha256:<hex>", "mmproj.gguf": "sha256:<hex>"}; with 'from', a projector alone""")


def _model_and_projector(
    svc: Services, uploads: dict[str, str], has_from: bool
) -> tuple[tuple[str, str] | None, Projector | None]:
    """Which upload is the model and which its projector (architecture clip), as Ollama's create
    tells a model's files apart; with `from`, the model is that one and no upload may be one."""
    projectors = [(name, d) for name, d in uploads.items() if is_projector(svc.registry.blobs.path(d))]
    models = [(name, d) for name, d in uploads.items() if (name, d) not in projectors]
    if len(models) != (0 if has_from else 1) or len(projectors) > 1:
        raise InvalidOptions(_FILES_SHAPE, field="files")
    projector = Projector(projectors[0][1], f"upload:{projectors[0][0]}") if projectors else None
    return (models[0] if models else None), projector


def _draft(svc: Services, body: CreateRequest, model: tuple[str, str] | None) -> dict[str, Any]:
    """The `draft` model's row columns, checked against the model's vocabulary (registry/drafts.py)."""
    assert body.draft is not None
    return draft_columns(svc.registry, *_base_file(svc, body, model), body.draft)


def _base_file(svc: Services, body: CreateRequest, model: tuple[str, str] | None) -> tuple[Path, str]:
    """The file of the model being created (an upload, or the `from` model's, checked by
    `blob_file`) and how errors name it, for what is checked against it (adapters, a draft)."""
    if model is not None:
        return svc.registry.blobs.path(model[1]), f"upload:{model[0]}"
    row = svc.registry.get(str(body.from_))
    return svc.registry.blob_file(row), row.name


def _check_template(template: str, deadline: Deadline) -> None:
    """`check_template` on the prompt pool (it renders the template several times: not on the
    event loop), stopped when the client leaves."""
    try:
        check_template(template, deadline.cancelled)
    except TemplateSyntaxError as exc:
        message = f"'template' is not a valid Jinja2 chat template: {exc.message}"
        raise InvalidOptions(message, field="template") from None


def _overrides(body: CreateRequest) -> Overrides:
    """The request's Modelfile settings as the registry keeps them, checked as `myllm create`
    checks a Modelfile's lines."""
    given = {name: value for name, value in (body.parameters or {}).items() if value is not None}
    for name in given:
        if name not in PARAMETERS:
            message = f"unknown parameter {name!r} (use {', '.join(PARAMETERS)})"
            raise InvalidOptions(message, field=f"parameters.{name}")
    return Overrides(
        parameters={name: stored_parameter(name, value) for name, value in given.items()},
        system=body.system,
        template_override=body.template,
        messages=[m.model_dump() for m in body.messages] if body.messages else None,
        license="\n".join(body.license) if isinstance(body.license, list) else body.license,
    )


# -- blobs ------------------------------------------------------------------------------------


@router.head("/api/blobs/{digest:path}")
async def blob_exists(digest: str, request: Request) -> Response:
    registry = services(request).registry
    if not await registry.pools.blobs.run(registry.blobs.exists, parse_digest(digest)):
        raise BlobNotFound(f"blob {digest} not found")
    return Response()


@router.post("/api/blobs/{digest:path}")
async def upload_blob(digest: str, request: Request) -> Response:
    """The body is kept only if it hashes to `digest` (else 400, nothing kept): 201, or 200
    when the store has the blob already; bounded as `registry/uploads.py` says (429, 408, 413,
    507). Nothing is registered until `create` names it."""
    require_admin(request, "uploading a blob")
    hexdigest = parse_digest(digest)
    length = request.headers.get("content-length")
    created = await services(request).uploads.receive(hexdigest, request.stream(), int(length) if length else None)
    return Response(status_code=201 if created else 200)
