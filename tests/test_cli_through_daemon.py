"""With a daemon running, the registry verbs go through its API, as Ollama's CLI does: here the
CLI's own MYLLM_HOME is empty, so every model it lists, shows, copies, creates, pulls and
removes is the daemon's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.server import running_servers

MYLLM = str(Path(sys.executable).parent / "myllm")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def daemon(private_home: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(the daemon's URL, the environment of a CLI with an empty home pointed at it)."""
    with running_servers(Settings(home=private_home, num_threads=2, num_ctx=1024)) as (url, _):
        env = {**os.environ, "MYLLM_HOME": str(tmp_path / "cli-home"), "MYLLM_PORT": url.rsplit(":", 1)[1]}
        yield url, env


def myllm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MYLLM, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=180)


def names(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{url}/api/models").json()["models"]]


def test_registry_verbs_go_through_the_daemon(daemon: tuple[str, dict[str, str]], smollm2_path: Path, tmp_path: Path) -> None:
    url, env = daemon
    listed = myllm(env, "list")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2:135m" in listed.stdout and "gemma3:270m" in listed.stdout

    shown = myllm(env, "show", "smollm2:135m", "--json")
    assert shown.returncode == 0, shown.stderr
    import json

    facts = json.loads(shown.stdout)
    detail = httpx.get(f"{url}/api/models/smollm2:135m").json()
    assert facts["digest"] == detail["digest"] and facts["context_length"] == 8192 and facts["template"]

    copied = myllm(env, "cp", "smollm2:135m", "mine")
    assert copied.returncode == 0 and copied.stdout.strip() == "copied 'smollm2:135m' to 'mine:latest'", copied.stderr
    assert "mine:latest" in names(url)

    created = myllm(env, "create", "assistant", "-f", str(REPO / "modelfiles" / "smollm2-assistant.Modelfile"))
    assert created.returncode == 0, created.stderr
    info = httpx.get(f"{url}/api/models/assistant").json()
    assert info["parameters"] == {"temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.15, "num_predict": 256}
    assert info["system"].startswith("You are a helpful assistant.")

    # FROM a file: uploaded as a blob, since the daemon need not see the CLI's files.
    os.link(smollm2_path, tmp_path / "smol.gguf")
    (tmp_path / "Modelfile").write_text("FROM ./smol.gguf\nSYSTEM Be terse.\nPARAMETER temperature 0.2\n")
    from_file = myllm(env, "create", "terse", "-f", str(tmp_path / "Modelfile"))
    assert from_file.returncode == 0, from_file.stderr
    terse = httpx.get(f"{url}/api/models/terse").json()
    assert terse["system"] == "Be terse." and terse["parameters"] == {"temperature": 0.2}
    assert terse["digest"] == detail["digest"]

    pulled = myllm(env, "pull", str(smollm2_path), "--name", "pulled:1")
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled pulled:1" in pulled.stdout and "pulled:1" in names(url)

    removed = myllm(env, "rm", "mine", "pulled:1")
    assert removed.returncode == 0 and "mine:latest" not in names(url) and "pulled:1" not in names(url)

    missing = myllm(env, "show", "nope:1")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == ["Error: model 'nope:1' not found"]

    cli_home = Registry.open(Settings(home=Path(env["MYLLM_HOME"])))
    try:
        assert cli_home.list() == [], "the CLI's own registry was never written"
    finally:
        cli_home.close()
