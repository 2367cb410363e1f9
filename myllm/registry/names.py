"""Model names: `family:tag`, lower case, safe to use anywhere (no `/`, no `..`)."""

from __future__ import annotations

import re

from myllm.errors import InvalidModelName

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?$")
DEFAULT_TAG = "latest"


def normalize(name: str) -> str:
    """Validate a name and add the default tag, as Ollama does (`smollm2` is `smollm2:latest`)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name or len(name) > 200:
        raise InvalidModelName(
            f"invalid model name {name!r}: use lower-case 'family:tag' "
            "(letters, digits, '.', '_', '-'; no '/' or '..')"
        )
    return name if ":" in name else f"{name}:{DEFAULT_TAG}"
