"""`myllm create NAME -f Modelfile`: a new name over an existing blob (or a new file), with
the Modelfile's defaults stored in the registry, where every API picks them up."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from myllm.errors import InvalidOptions
from myllm.modelfile import Modelfile, ModelfileError, parse
from myllm.pull import local_projector, pull
from myllm.pull.progress import silent
from myllm.registry.adapter_check import check_adapter
from myllm.registry.drafts import draft_columns
from myllm.registry.gguf_check import check_gguf
from myllm.registry.names import normalize
from myllm.registry.projector_check import is_projector
from myllm.registry.schema import ModelRow
from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings


def create_model(registry: Registry, settings: Settings, name: str, text: str, base_dir: Path) -> ModelRow:
    """Later settings win over the base model's: parameters merge key by key; SYSTEM,
    TEMPLATE, MESSAGEs and LICENSE replace the base's when given. A projector file (a second
    FROM) replaces the base model's. An existing `name` is replaced. The row and its settings
    are written in one transaction, so a create that dies midway leaves the old model (or
    none), never a name without its settings."""
    mf = parse(text)
    key = normalize(name)
    overrides = _overrides(mf)
    base, projector = _froms(registry, mf, text, base_dir)
    if mf.adapters:
        adapters = _stored_adapters(registry, mf, text, base_dir, *_base_file(registry, base))
        overrides = replace(overrides, adapters=adapters)
    if mf.draft is not None:
        overrides = replace(overrides, draft=_draft(registry, mf.draft, *_base_file(registry, base), text))
    if isinstance(base, Path):
        return pull(registry, settings, str(base), name=key, overrides=overrides, projector=projector).model
    if projector is None:
        return registry.copy(base.name, key, overrides, replace=True)
    with local_projector(registry, projector, silent) as stored:
        return registry.copy(base.name, key, overrides, replace=True, projector=stored)


def _overrides(mf: Modelfile) -> Overrides:
    return Overrides(
        parameters=mf.parameters,
        system=mf.system,
        template_override=mf.template,
        messages=mf.messages or None,  # no MESSAGE lines: the base's seed conversation stays
        license=mf.license,
    )


def _stored_adapters(registry: Registry, mf: Modelfile, text: str, base_dir: Path, base: Path,
                     base_name: str) -> list[dict[str, Any]]:
    """The ADAPTER files, each checked against the base model (`check_adapter`) and stored as a
    blob, in order. A create that fails later leaves a blob no model uses, which the store's
    sweep of unused blobs removes (`MYLLM_BLOB_TTL`)."""
    stored = []
    for value, line in zip(mf.adapters, _lines(text, "ADAPTER"), strict=True):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ModelfileError(line, f"ADAPTER {value!r} is no file")
        check_adapter(path, f"file:{path.name}", base, base_name)
        digest = registry.blobs.commit(registry.blobs.stage_copy(path))
        stored.append({"digest": digest, "size": path.stat().st_size})
    return stored


def _draft(registry: Registry, draft: str, base: Path, base_name: str, text: str) -> dict[str, object]:
    """The DRAFT line's model as the row's columns, checked against the base model's vocabulary;
    an error naming the DRAFT line."""
    try:
        return draft_columns(registry, base, base_name, draft)
    except InvalidOptions as exc:
        raise ModelfileError(_lines(text, "DRAFT")[0], exc.message) from None


def _base_file(registry: Registry, base: ModelRow | Path) -> tuple[Path, str]:
    """The base model's file (a registered model's checked by `blob_file`) and how errors name it."""
    return (base, f"file:{base.name}") if isinstance(base, Path) else (registry.blob_file(base), base.name)


def _froms(registry: Registry, mf: Modelfile, text: str, base_dir: Path) -> tuple[ModelRow | Path, Path | None]:
    """The model (registered, or a GGUF file) and the projector file the FROM lines name, told
    apart as Ollama does, by the files' architecture (a projector's is clip), in either order."""
    models: list[tuple[int, ModelRow | Path]] = []
    projectors: list[tuple[int, Path]] = []
    for index, value in enumerate([mf.base, *([mf.projector] if mf.projector else [])]):
        row = registry.find(value)
        if row is not None:
            models.append((index, row))
            continue
        path = _from_file(value, text, base_dir, index)
        (projectors if is_projector(path) else models).append((index, path))
    if len(projectors) > 1:
        raise ModelfileError(_from_line(text, 1),
                             "both FROM lines name projectors (architecture clip); one must be the model")
    if len(models) > 1:
        for _, model in models:  # a file that is no model says so first: a projector no GGUF reads is no projector
            if isinstance(model, Path):
                check_gguf(model, f"file:{model}")
        raise ModelfileError(_from_line(text, 1), "two FROM lines name models; a second FROM is the model's projector "
                             "(an mmproj GGUF, architecture clip)")
    if not models:
        raise ModelfileError(_from_line(text, projectors[0][0]), "FROM names a projector (architecture clip), not a "
                             "model: add a FROM line with the model it belongs to")
    return models[0][1], projectors[0][1] if projectors else None


def _from_file(value: str, text: str, base_dir: Path, index: int) -> Path:
    """A FROM value as a GGUF path, relative to the Modelfile's folder; an error naming the FROM
    line when it is no file either."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ModelfileError(_from_line(text, index), f"FROM {value!r} is neither a registered model nor a file")
    return path


def _from_line(text: str, index: int) -> int:
    """The line number of the `index`-th FROM line (from 0)."""
    lines = _lines(text, "FROM")
    return lines[min(index, len(lines) - 1)] if lines else 1


def _lines(text: str, instruction: str) -> list[int]:
    """The numbers (from 1) of the lines that give `instruction`, in order."""
    return [n + 1 for n, raw in enumerate(text.splitlines()) if raw.strip().upper().startswith(instruction)]
