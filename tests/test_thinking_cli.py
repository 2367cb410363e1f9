"""`myllm run` with a thinking model, run as a user runs it against a real daemon: in a
terminal (a real pseudo-terminal) the thinking is dimmed and a blank line parts it from the
answer, `/set nothink` and `/set think` switch it for the messages after; piped, stdout gets the
answer alone and stderr the thinking. The model is test_thinking_api.py's "thinker", greedy
and short here, so what the CLI prints can be checked against what the API answers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_server
from tests.terminal import MYLLM, Terminal, port_of
from tests.test_thinking_api import BUDGET, THINK_TEMPLATE

DIM, UNDIM = "\x1b[2m", "\x1b[22m"
QUESTION = "What is two and two?"
GREEDY = {"temperature": 0, "num_predict": 40}


@pytest.fixture(scope="module")
def daemon(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The thinker and a plain copy of its model, greedy and short by their own parameters:
    the CLI sends no options."""
    home = writable_home(models_home, tmp_path_factory.mktemp("thinking-cli") / "home")
    registry = Registry.open(Settings(home=home))
    registry.copy("smollm2:135m", "thinker", Overrides(parameters={"thinking_budget": BUDGET, **GREEDY},
                                                      template_override=THINK_TEMPLATE))
    registry.copy("smollm2:135m", "plain", Overrides(parameters=GREEDY))
    registry.close()
    with running_server(Settings(home=home, num_threads=2, num_ctx=1024)) as url:
        yield url


def api_chat(url: str, model: str, **extra: Any) -> tuple[str, str]:
    """(thinking, answer) of a fresh conversation's first answer, from the native API."""
    message = httpx.post(f"{url}/api/chat", json={"model": model, "messages": [{"role": "user", "content": QUESTION}],
                                                  **extra}, timeout=120).json()["message"]
    return message.get("thinking") or "", message["content"]


def shown(thinking: str, answer: str) -> str:
    """What the terminal gets: the thinking dimmed, its line ended, a blank line, the answer."""
    return f"{DIM}{thinking}{UNDIM}{'' if thinking.endswith(chr(10)) else chr(10)}\n{answer}\n"


def test_the_repl_dims_the_thinking_and_switches_it(daemon: str) -> None:
    thinking, answer = api_chat(daemon, "thinker")
    off = api_chat(daemon, "thinker", think=False)
    assert thinking and answer and off[1] and not off[0]
    terminal = Terminal(daemon, "thinker")
    try:
        listed = terminal.send("/?")
        assert "/set think [LEVEL]" in listed and "/set nothink" in listed
        assert terminal.send(QUESTION) == shown(thinking, answer)  # the model's default: it thinks

        assert terminal.send("/set nothink") == "Set 'nothink' mode.\n"
        terminal.send("/clear")  # a fresh conversation, comparable with the API's
        assert terminal.send(QUESTION) == f"{off[1]}\n"

        assert terminal.send("/set think") == "Set 'think' mode.\n"
        terminal.send("/clear")
        assert terminal.send(QUESTION) == shown(thinking, answer)

        assert terminal.send("/set think high") == "Set 'think' mode to 'high'.\n"
        assert "Unknown thinking level 'loud'" in terminal.send("/set think loud")
    finally:
        assert terminal.close() == 0


def test_a_plain_model_is_unchanged(daemon: str) -> None:
    terminal = Terminal(daemon, "plain")
    try:
        plain = terminal.send(QUESTION)
        assert plain == f"{api_chat(daemon, 'plain')[1]}\n" and DIM not in plain
        said = terminal.send("/set think")
        assert "warning: model 'plain' does not think" in said
        terminal.send("/clear")
        assert terminal.send(QUESTION) == plain
    finally:
        assert terminal.close() == 0


def myllm(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MYLLM, "run", *args, "--port", port_of(url)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=os.environ.copy(), timeout=180)


def api_generate(url: str, **extra: Any) -> tuple[str, str]:
    r = httpx.post(f"{url}/api/generate", json={"model": "thinker", "prompt": QUESTION, **extra}, timeout=120).json()
    return r.get("thinking") or "", r["text"]


def test_piped_the_answer_is_stdout_and_the_thinking_stderr(daemon: str) -> None:
    thinking, answer = api_generate(daemon)
    assert thinking and answer
    proc = myllm(daemon, "thinker", QUESTION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{answer}\n" and DIM not in proc.stdout + proc.stderr
    assert proc.stderr == thinking + ("" if thinking.endswith("\n") else "\n")
    assert myllm(daemon, "thinker", QUESTION, "--think").stdout == proc.stdout

    off = myllm(daemon, "thinker", QUESTION, "--no-think")
    assert off.returncode == 0 and off.stderr == ""
    assert off.stdout == f"{api_generate(daemon, think=False)[1]}\n"
    plain = myllm(daemon, "plain", QUESTION, "--think")
    assert plain.returncode == 0 and plain.stdout.strip() and DIM not in plain.stdout
    assert plain.stderr.startswith("warning: model 'plain' does not think")
