"""`myllm run` as the CLI tests drive it: the installed console script, in a real
pseudo-terminal or piped, against a daemon's port."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect

MYLLM = str(Path(sys.executable).parent / "myllm")


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


def environment(folder: Path | None) -> dict[str, str]:
    """The CLI's environment: this one, with HOME at `folder` when given (where `~` leads)."""
    return {**os.environ} if folder is None else {**os.environ, "HOME": str(folder)}


class Terminal:
    """`myllm run MODEL` in a pseudo-terminal `columns` wide, working in `folder` (also its HOME)
    when given; `send` returns what a line printed (its echo left out, line endings as written)."""

    def __init__(self, url: str, model: str, folder: Path | None = None, columns: int = 200) -> None:
        self.child = pexpect.spawn(MYLLM, ["run", model, "--port", port_of(url)], env=environment(folder),
                                   cwd=None if folder is None else str(folder), encoding="utf-8", timeout=120,
                                   dimensions=(40, columns))
        self.child.expect(">>> ")

    def send(self, line: str) -> str:
        self.child.sendline(line)
        self.child.expect(">>> ")
        printed = (self.child.before or "").replace("\r\n", "\n")
        echo, _, rest = printed.partition("\n")
        assert echo == line
        return rest

    def close(self) -> int | None:
        self.child.sendline("/bye")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus
