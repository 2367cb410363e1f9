"""`myllm create NAME -f Modelfile`: a new name over an existing blob (or a new file), with
the Modelfile's defaults stored in the registry, where every API picks them up."""

from __future__ import annotations

from pathlib import Path

from myllm.modelfile import Modelfile, ModelfileError, parse
from myllm.pull import pull
from myllm.registry.names import normalize
from myllm.registry.schema import ModelRow
from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings


def create_model(registry: Registry, settings: Settings, name: str, text: str, base_dir: Path) -> ModelRow:
    """Later settings win over the base model's: parameters merge key by key; SYSTEM,
    TEMPLATE, MESSAGEs and LICENSE replace the base's when given. An existing `name` is
    replaced. The row and its settings are written in one transaction, so a create that dies
    midway leaves the old model (or none), never a name without its settings."""
    mf = parse(text)
    key = normalize(name)
    overrides = _overrides(mf)
    base = registry.find(mf.base)
    if base is not None:
        return registry.copy(base.name, key, overrides, replace=True)
    return pull(registry, settings, str(_base_file(mf, text, base_dir)), name=key, overrides=overrides).model


def _overrides(mf: Modelfile) -> Overrides:
    return Overrides(
        parameters=mf.parameters,
        system=mf.system,
        template_override=mf.template,
        messages=mf.messages or None,  # no MESSAGE lines: the base's seed conversation stays
        license=mf.license,
    )


def _base_file(mf: Modelfile, text: str, base_dir: Path) -> Path:
    """FROM as a GGUF path, relative to the Modelfile's folder; an error naming the FROM line
    when it is no file either."""
    path = Path(mf.base).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        line = next((n + 1 for n, raw in enumerate(text.splitlines()) if raw.strip().upper().startswith("FROM")), 1)
        raise ModelfileError(line, f"FROM {mf.base!r} is neither a registered model nor a file")
    return path
