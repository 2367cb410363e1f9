"""Image files named in a message typed to `myllm run`, read and sent as the message's images, as
Ollama's CLI does (its `extractFileNames`/`extractFileData`): a path ending in .png, .jpg, .jpeg,
.webp or .gif is taken out of the text and its file's bytes go with the message.

A path may be absolute, start with `~`, or be relative to the working directory; one with spaces
is quoted ('...' or "...", as a terminal pastes a dropped file) or has them escaped with a
backslash. Ollama passes over a path whose file does not exist and sends it as text; here a
written-out path (quoted, or with a `/` or `~`) that cannot be read is refused, so a typo is not
sent as a question about a file the model never saw. A bare name (`cat.png`) is an image only
when that file is there: otherwise it is a word in the text. URLs stay text. The bytes are not
judged here: the daemon checks them and answers a bad image with its 400."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_EXT = r"\.(?:png|jpe?g|webp|gif)"
PATHS = re.compile(
    rf"""(?<![^\s(])                        # at the start, or after a space or a parenthesis
    (?: '(?P<single>[^'\n]+?{_EXT})'
      | "(?P<double>[^"\n]+?{_EXT})"
      | (?P<bare>(?:\\.|[^\s'"\\])+?{_EXT})  # a backslash escapes the next character (a space)
    )
    (?=$|[\s,;:!?)]|\.(?:\s|$))             # then a space, punctuation or the end""",
    re.IGNORECASE | re.VERBOSE,
)


class UnreadableImage(Exception):
    """A written-out image path whose file cannot be read; the message is not sent."""


@dataclass(frozen=True)
class Mention:
    """One image path in a message: where it is, and the path as the user meant it."""

    start: int
    end: int
    path: str
    written_out: bool
    """Quoted, or with a `/` or `~`: it names a file, so one that cannot be read is an error."""


@dataclass(frozen=True)
class Attached:
    """A message with its image paths taken out, and the images' bytes in the order written."""

    text: str
    images: list[bytes]
    paths: list[str]


def mentions(text: str) -> list[Mention]:
    found = []
    for match in PATHS.finditer(text):
        quoted = match["single"] or match["double"]
        path = quoted or re.sub(r"\\(.)", r"\1", match["bare"])
        if "://" in path:
            continue
        found.append(Mention(match.start(), match.end(), path, bool(quoted) or "/" in path or path.startswith("~")))
    return found


def leads_with_image(line: str) -> bool:
    """Whether a line starting with `/` starts with an image path (a message), not a command."""
    found = mentions(line)
    return bool(found) and found[0].start == 0


def attach(text: str) -> Attached:
    """Read every image the message names; `UnreadableImage` if a written-out one cannot be read."""
    images, paths, kept = [], [], text
    for mention in reversed(mentions(text)):  # from the end, so the earlier spans stay where they are
        file = Path(mention.path).expanduser()
        if not mention.written_out and not file.is_file():
            continue
        try:
            images.append(file.read_bytes())
        except OSError as exc:
            raise UnreadableImage(f"cannot read image '{mention.path}': {exc.strerror or exc}") from None
        paths.append(mention.path)
        before, after = kept[:mention.start].rstrip(" \t"), kept[mention.end:].lstrip(" \t")
        apart = before[-1:] not in ("", "\n") and after[:1] not in ("", "\n", *",.;:!?)")
        kept = before + (" " if apart else "") + after
    return Attached(kept.strip() if paths else text, images[::-1], paths[::-1])
