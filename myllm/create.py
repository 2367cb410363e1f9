"""`myllm create NAME -f Modelfile`: a new name over an existing blob (or a new file), with
the Modelfile's defaults stored in the registry, where every API picks them up."""

from __future__ import annotations

from pathlib import Path

from myllm.modelfile import ModelfileError, parse
from myllm.pull import pull
from myllm.registry.names import normalize
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.settings import Settings


def create_model(registry: Registry, settings: Settings, name: str, text: str, base_dir: Path) -> ModelRow:
    """Later settings win over the base model's: parameters merge key by key; SYSTEM,
    TEMPLATE, MESSAGEs and LICENSE replace the base's when given. An existing `name` is
    replaced."""
    mf = parse(text)
    key = normalize(name)
    base = registry.find(mf.base)
    if base is None:
        path = Path(mf.base).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            line = next((n + 1 for n, raw in enumerate(text.splitlines()) if raw.strip().upper().startswith("FROM")), 1)
            raise ModelfileError(line, f"FROM {mf.base!r} is neither a registered model nor a file")
        base = pull(registry, settings, str(path), name=key).model
    elif base.name != key:
        if registry.find(key) is not None:
            registry.remove(key)
        registry.copy(base.name, key)
    return registry.set_overrides(
        key,
        parameters={**(base.parameters or {}), **mf.parameters},
        system=mf.system if mf.system is not None else base.system,
        template_override=mf.template if mf.template is not None else base.template_override,
        messages=mf.messages or base.messages,
        license=mf.license if mf.license is not None else base.license,
    )
