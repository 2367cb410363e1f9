"""Getting models onto the machine: hub, local file, Python package, or a catalog name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from myllm.errors import Forbidden, InvalidModelName, ModelNotFound, PullError, SourceNotFound
from myllm.pull import hub
from myllm.pull.package import find_gguf
from myllm.pull.progress import PullProgress, silent
from myllm.pull.sources import (
    CATALOG,
    CatalogEntry,
    FileSource,
    HubSource,
    PackageSource,
    Source,
    default_name,
    inside,
    parse_source,
)
from myllm.registry.gguf_check import check_gguf
from myllm.registry.names import normalize
from myllm.registry.projector_check import check_projector
from myllm.registry.schema import ModelRow
from myllm.registry.store import Overrides, Projector, Registry
from myllm.settings import Settings

__all__ = ["CATALOG", "PullResult", "ensure_model", "pull", "parse_source"]


@dataclass(frozen=True)
class PullResult:
    model: ModelRow
    source: str
    """The source actually used, e.g. the package a catalog name fell back to."""
    note: str | None = None


def pull(
    registry: Registry,
    settings: Settings,
    spec: str,
    name: str | None = None,
    progress: PullProgress = silent,
    overrides: Overrides | None = None,
    local_dirs: list[Path] | None = None,
    projector: Path | None = None,
) -> PullResult:
    """Fetch `spec` into the blob store and register it under `name` (or a derived one).

    `overrides` (a Modelfile's settings) are written in the row's own transaction, replacing
    a model of that name whole (see `Registry.register`). A hub repo's projector for the file
    (`hub.projector_for`) comes with it; `projector` is a local projector file to register
    beside the model (a Modelfile's second FROM). Raises a `PullError` subclass with a
    one-line reason; leaves no row, blob or temp file behind on failure. `local_dirs`: where
    a local file may be read from (see `check_local`); None (the CLI's own pulls): anywhere.
    """
    source = parse_source(spec, local_dirs)
    if local_dirs is not None and isinstance(source, FileSource):
        check_local(source.path, local_dirs)
    target = normalize(name or default_name(source))
    if isinstance(source, CatalogEntry):
        try:
            return _pull(registry, settings, source.hub, target, progress, overrides, projector)
        except hub.HubUnreachable as exc:
            fallback = PackageSource(source.package)
            result = _pull(registry, settings, fallback, target, progress, overrides, projector)
            return PullResult(result.model, result.source, f"{exc.message}; used the package {fallback}")
    return _pull(registry, settings, source, target, progress, overrides, projector)


def check_local(path: Path, local_dirs: list[Path]) -> None:
    """A client of the daemon may name a file on the daemon's machine only under the folders an
    administrator listed (`MYLLM_MODEL_DIRS`). Checked before the path is touched, and the
    refusal is the same whether the file exists or not: a client learns nothing of other files."""
    if not inside(path, local_dirs):
        raise Forbidden("local model files may only come from the folders in MYLLM_MODEL_DIRS"
                        + ("" if local_dirs else " (none are set)"))


def ensure_model(
    registry: Registry, settings: Settings, wanted: str, quant: str | None = None, local_dirs: list[Path] | None = None
) -> ModelRow:
    """A registered model by name, else pulled from `wanted` (a path, repo or catalog name);
    `quant` picks the quantization of a repo given without one. Anything that cannot be
    found or fetched is `ModelNotFound`; `local_dirs` as for `pull`."""
    if not wanted.isprintable():  # control characters, NUL, lone surrogates: no name or path has them
        raise InvalidModelName(f"invalid model name {wanted!r}: it holds characters that are not printable text")
    row = registry.find(wanted)
    if row is not None:
        return row
    try:
        source = parse_source(wanted, local_dirs)
        if quant and isinstance(source, HubSource) and not source.quant and not source.filename:
            wanted = f"{source.repo_id}:{quant}"
        return pull(registry, settings, wanted, local_dirs=local_dirs).model
    except PullError as exc:
        raise ModelNotFound(wanted, f"model '{wanted}' cannot be found or downloaded: {exc.message}") from exc


def _pull(
    registry: Registry,
    settings: Settings,
    source: Source,
    name: str,
    progress: PullProgress,
    overrides: Overrides | None,
    projector_file: Path | None,
) -> PullResult:
    if isinstance(source, HubSource):
        if projector_file is not None:
            raise PullError(f"{source}: a hub model comes with its repo's own projector, not a local one")
        row = _pull_hub(registry, settings, source, name, progress, overrides)
    else:
        with ExitStack() as stack:
            projector = None
            if projector_file is not None:
                projector = stack.enter_context(local_projector(registry, projector_file, progress))
            row = _register(registry, source, name, progress, overrides, projector)
    return PullResult(row, row.source or str(source))


@contextmanager
def local_projector(registry: Registry, path: Path, progress: PullProgress) -> Iterator[Projector]:
    """A projector file stored for the model registered within the block (`stored_projector`)."""
    shown = str(FileSource(path))
    if not path.is_file():
        raise SourceNotFound(f"{path}: no such file")
    check_projector(path, shown)  # before copying
    staged = registry.blobs.stage_copy(path, lambda d, t: progress("copying", d, t))
    with registry.stored_projector(staged, shown) as projector:
        yield projector


def _register(
    registry: Registry,
    source: Source,
    name: str,
    progress: PullProgress,
    overrides: Overrides | None,
    projector: Projector | None,
) -> ModelRow:
    checking = lambda: progress("checking", 0, None)  # noqa: E731
    match source:
        case FileSource(path=path):
            if not path.is_file():
                raise SourceNotFound(f"{path}: no such file")
            check_gguf(path, str(source))  # before copying what may be gigabytes of anything
            staged = registry.blobs.stage_copy(path, lambda d, t: progress("copying", d, t))
            return registry.register(name, staged, str(source), on_verify=checking, overrides=overrides,
                                     projector=projector)
        case PackageSource():
            found = find_gguf(source)
            if isinstance(found, Path):
                check_gguf(found, str(source))
                staged = registry.blobs.stage_copy(found, lambda d, t: progress("copying", d, t))
            else:
                out = registry.blobs.temp_path().with_suffix(".gguf")
                progress("assembling", 0, None)
                try:
                    found(out)
                except Exception as exc:
                    out.unlink(missing_ok=True)
                    raise PullError(f"{source}: assemble() failed: {exc}") from exc
                staged = registry.blobs.stage_move(out, lambda d, t: progress("verifying", d, t))
            return registry.register(name, staged, str(source), on_verify=checking, overrides=overrides,
                                     projector=projector)
    raise PullError(f"cannot pull {source}")


def _pull_hub(
    registry: Registry, settings: Settings, source: HubSource, name: str, progress: PullProgress,
    overrides: Overrides | None,
) -> ModelRow:
    """The model's file and the repo's projector for it, if it has one: both downloaded (each
    resumable) before either is stored; the projector is stored first, and removed again if
    the model fails."""
    hub_file = hub.resolve(source)
    path = hub.download(hub_file, settings.downloads_dir, progress)
    mmproj = hub.download(hub_file.projector, settings.downloads_dir, progress) if hub_file.projector else None
    verifying = lambda d, t: progress("verifying", d, t)  # noqa: E731
    staged = registry.blobs.stage_move(path, verifying)
    with ExitStack() as stack:
        projector = None
        if hub_file.projector is not None and mmproj is not None:
            shown = f"hf:{hub_file.repo_id}/{hub_file.projector.filename}"
            try:
                staged_mmproj = registry.blobs.stage_move(mmproj, verifying)
                stored = registry.stored_projector(staged_mmproj, shown, hub_file.projector.sha256)
                projector = stack.enter_context(stored)
            except BaseException:
                registry.blobs.discard(staged)
                raise
        where = f"hf:{hub_file.repo_id}/{hub_file.filename}"
        return registry.register(name, staged, where, hub_file.sha256, overrides=overrides, projector=projector)
