"""GGUF files shipped inside Python packages (how the test models reach a machine with no hub).

The package is located with `importlib.util.find_spec`, not imported, because some such
packages import heavy plugins at import time. Only when no `.gguf` file sits in the package
is it imported, for an `assemble(path)` function that writes the file from chunks.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from myllm.errors import PullError, SourceNotFound
from myllm.pull.sources import PackageSource


def find_gguf(source: PackageSource) -> Path | Callable[[Path], object]:
    """The shipped file, or the package's `assemble` function when it builds the file."""
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFound(
            f"{source}: Python package '{source.package}' is not installed "
            f"(pip install {source.package.replace('_', '-')})"
        )
    files = sorted(
        path for root in spec.submodule_search_locations for path in Path(root).rglob("*.gguf")
    )
    if len(files) == 1:
        return files[0]
    if len(files) > 1:
        raise PullError(f"{source}: the package ships several .gguf files: {', '.join(f.name for f in files)}")
    module = importlib.import_module(source.package)
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise SourceNotFound(f"{source}: the package ships no .gguf file and has no assemble() function")
    return assemble
