"""Hugging Face downloads through `huggingface-hub`: pick the file, download resumably, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from myllm.errors import PullError, SourceNotFound
from myllm.pull.progress import PullProgress
from myllm.pull.sources import HubSource


class HubUnreachable(PullError):
    """The hub could not be asked at all (offline mode, no network)."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None
    sha256: str | None
    size: int | None
    projector: HubFile | None = None
    """The repo's multimodal projector for this file (`projector_for`), fetched with it."""


def _endpoint() -> str | None:
    """Read at call time: huggingface-hub reads HF_ENDPOINT once, at import."""
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _translate(exc: Exception, what: str) -> PullError:
    from huggingface_hub import errors

    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceNotFound(f"{what}: repository not found on the hub")
    if isinstance(exc, errors.GatedRepoError):
        return PullError(f"{what}: the repository is gated; set HF_TOKEN to a token with access")
    if isinstance(exc, errors.EntryNotFoundError | errors.RevisionNotFoundError):
        return SourceNotFound(f"{what}: file or revision not found on the hub")
    if isinstance(exc, errors.OfflineModeIsEnabled | errors.LocalEntryNotFoundError):
        return HubUnreachable(f"{what}: the hub cannot be reached ({exc.__class__.__name__})")
    if isinstance(exc, errors.HfHubHTTPError):
        return PullError(f"{what}: hub error: {str(exc).splitlines()[0]}")
    # Anything else is the transport failing (refused, reset, cut mid-body).
    return HubUnreachable(f"{what}: the hub cannot be reached: {exc.__class__.__name__}: {exc}")


def _quant_of(filename: str) -> str | None:
    m = re.search(r"[._-]((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)\.gguf$", filename, re.IGNORECASE)
    return m.group(1).upper() if m else None


def _bits(filename: str) -> int:
    """The bits of a file's precision (Q4_K_M: 4, F16: 16; 0 when its name gives none)."""
    digits = re.search(r"\d+", _quant_of(filename) or "")
    return int(digits.group()) if digits else 0


def projector_for(model: str, names: list[str]) -> str | None:
    """The projector llama.cpp's `-hf` picks for the GGUF `model` among a repo's files
    (common/download.cpp `find_best_mmproj`): a .gguf whose name holds `mmproj`, in the model's
    folder or one that shares more of its path, of the precision closest to the model's (a
    Q4_K_M model gets mmproj-Q8_0 over mmproj-F16); the first of equals."""
    folder = model.split("/")[:-1]
    best: tuple[int, int] | None = None
    chosen = None
    for name in names:
        if not name.endswith(".gguf") or "mmproj" not in name:
            continue
        parts = name.split("/")[:-1]
        if parts != folder[: len(parts)]:
            continue  # not in the model's folder or one above it
        rank = (-len(parts), abs(_bits(name) - _bits(model)))
        if best is None or rank < best:
            best, chosen = rank, name
    return chosen


def _is_model(name: str) -> bool:
    """A repo's GGUF that is a model, not a projector or an importance matrix (llama.cpp's
    `gguf_filename_is_model`)."""
    base = name.rsplit("/", 1)[-1]
    return name.endswith(".gguf") and "mmproj" not in base and "imatrix" not in base


def resolve(source: HubSource) -> HubFile:
    """Ask the hub which file the source means, with its sha256 for verification."""
    from huggingface_hub import HfApi

    if _offline():
        raise HubUnreachable(f"{source}: HF_HUB_OFFLINE is set")
    api = HfApi(endpoint=_endpoint(), token=os.environ.get("HF_TOKEN") or None)
    try:
        info = api.model_info(source.repo_id, files_metadata=True)
    except Exception as exc:
        raise _translate(exc, str(source)) from exc
    siblings = {s.rfilename: s for s in info.siblings or []}
    ggufs = sorted(name for name in siblings if _is_model(name))
    if source.filename:
        chosen = source.filename
        if chosen not in siblings:
            raise SourceNotFound(f"{source}: no file {chosen!r} in {source.repo_id}")
    else:
        wanted = (source.quant or "Q4_K_M").upper()
        matches = [name for name in ggufs if (_quant_of(name) or "") == wanted]
        if not matches and source.quant is None and len(ggufs) == 1:
            matches = ggufs
        if not matches:
            quants = sorted({q for name in ggufs if (q := _quant_of(name))})
            raise SourceNotFound(
                f"{source}: no {wanted} .gguf in {source.repo_id}"
                + (f" (available: {', '.join(quants)})" if quants else " (the repo has no .gguf files)")
            )
        if len(matches) > 1:
            raise PullError(f"{source}: several files match {wanted}: {', '.join(matches)}; name one")
        chosen = matches[0]
    projector = projector_for(chosen, sorted(siblings)) if _is_model(chosen) else None

    def hub_file(name: str) -> HubFile:
        sibling = siblings[name]
        lfs = getattr(sibling, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        return HubFile(source.repo_id, name, info.sha, sha, getattr(sibling, "size", None))

    return dataclasses.replace(hub_file(chosen), projector=hub_file(projector) if projector else None)


def download(hub_file: HubFile, downloads_dir: Path, progress: PullProgress) -> Path:
    """Download to `downloads/<key>.partial`, resuming from whatever an earlier, interrupted
    pull left there.

    huggingface-hub resolves the file (redirects, auth headers, size); the bytes are moved
    here because the library deletes its own partial file when a call fails, so it can only
    resume within one process, not across a crash or a second `myllm pull`.
    """
    import httpx  # here, not at import: a daemon that never pulls from a hub saves ~4 MB
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    what = f"hf:{hub_file.repo_id}/{hub_file.filename}"
    token = os.environ.get("HF_TOKEN") or None
    url = hf_hub_url(hub_file.repo_id, hub_file.filename, revision=hub_file.revision, endpoint=_endpoint())
    try:
        meta = get_hf_file_metadata(url, token=token)
    except Exception as exc:
        raise _translate(exc, what) from exc
    total = meta.size or hub_file.size
    key = hub_file.sha256 or hashlib.sha256(f"{url}|{meta.etag}".encode()).hexdigest()
    downloads_dir.mkdir(parents=True, exist_ok=True)
    partial = downloads_dir / f"{key}.partial"
    headers = build_hf_headers(token=token)
    attempts_left = _RETRIES
    while True:
        done = partial.stat().st_size if partial.exists() else 0
        if total is not None and done > total:
            partial.unlink()
            done = 0
        if total is not None and done == total:
            return partial
        progress("downloading", done, total)
        try:
            done = _fetch_range(meta.location or url, headers, partial, done, total, progress)
        except httpx.HTTPStatusError as exc:
            raise PullError(f"{what}: hub answered {exc.response.status_code} while downloading") from exc
        except httpx.TransportError as exc:
            attempts_left -= 1
            if attempts_left <= 0:
                have = partial.stat().st_size if partial.exists() else 0
                raise HubUnreachable(
                    f"{what}: download interrupted at {have} of {total} bytes ({exc.__class__.__name__}); "
                    "run the same pull again to resume"
                ) from exc
            time.sleep(0.5)
            continue
        if total is None or done >= total:
            return partial


_RETRIES = 3


def _fetch_range(
    url: str, headers: dict[str, str], partial: Path, start: int, total: int | None, progress: PullProgress
) -> int:
    import httpx

    request_headers = dict(headers, **({"Range": f"bytes={start}-"} if start else {}))
    request_headers["Accept-Encoding"] = "identity"
    with httpx.stream("GET", url, headers=request_headers, follow_redirects=True, timeout=30) as response:
        response.raise_for_status()
        if start and response.status_code != 206:
            start = 0  # the server ignored the range: start over
        with partial.open("r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            done = start
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
                done += len(chunk)
                progress("downloading", done, total)
            out.flush()
            os.fsync(out.fileno())
    return done
