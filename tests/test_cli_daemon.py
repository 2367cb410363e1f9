"""The CLI verbs that talk to the daemon (run, ps, stop) and the ones that shape models
(create, cp), run as a user runs them; `run` is also driven in a real pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest

from myllm.settings import Settings
from tests.server import free_port, running_server
from tests.terminal import MYLLM, port_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def daemon(private_home: Path) -> Iterator[str]:
    with running_server(Settings(home=private_home, num_threads=2, num_ctx=2048)) as url:
        yield url


def myllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MYLLM, *args], capture_output=True, text=True, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL, env=os.environ.copy(), timeout=180)


def test_run_one_shot_and_stdin(daemon: str) -> None:
    port = port_of(daemon)
    proc = myllm("run", "smollm2:135m", "Say hello in French.", "--port", port)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    piped = myllm("run", "smollm2:135m", "--port", port, stdin="What is 2 + 2?\n")
    assert piped.returncode == 0 and piped.stdout.strip()


def test_ps_and_stop(daemon: str) -> None:
    port = port_of(daemon)
    httpx.post(f"{daemon}/api/models/smollm2:135m/load", timeout=60)
    table = myllm("ps", "--port", port).stdout
    row = next(line for line in table.splitlines() if "smollm2:135m" in line)
    assert "100% CPU" in row and "2048" in row and "minutes from now" in row
    assert " 0/4 " in row and " MB " in row  # no sequence busy of 4; the runner's measured memory
    import signal

    watching = subprocess.Popen([MYLLM, "ps", "--watch", "--port", port], stdout=subprocess.PIPE, text=True)
    time.sleep(3)  # at least one refresh
    watching.send_signal(signal.SIGINT)
    assert watching.wait(10) == 0 and "smollm2:135m" in (watching.stdout.read() if watching.stdout else "")
    stopped = myllm("stop", "smollm2:135m", "--port", port)
    assert stopped.stdout.strip() == "Model 'smollm2:135m' unloaded"
    assert "smollm2:135m" not in myllm("ps", "--port", port).stdout


def test_client_verbs_without_daemon() -> None:
    port = str(free_port())
    for args in (["ps"], ["stop", "smollm2:135m"], ["run", "smollm2:135m", "hi"]):
        proc = myllm(*args, "--port", port)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"myllm is not running at http://127.0.0.1:{port}" in lines[0]
        assert "myllm serve" in lines[0]


def test_cp(private_home: Path) -> None:
    assert myllm("cp", "smollm2:135m", "mine").stdout.strip() == "copied 'smollm2:135m' to 'mine:latest'"
    assert "mine:latest" in myllm("list").stdout
    proc = myllm("cp", "smollm2:135m", "mine")
    assert proc.returncode == 1 and "already exists" in proc.stderr


def test_create_assistant_from_modelfile(daemon: str) -> None:
    proc = myllm("create", "assistant", "-f", str(REPO / "modelfiles" / "smollm2-assistant.Modelfile"))
    assert proc.returncode == 0, proc.stderr
    info = httpx.get(f"{daemon}/api/models/assistant").json()
    assert info["parameters"] == {"temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.15, "num_predict": 256}
    base = httpx.get(f"{daemon}/api/models/smollm2:135m").json()
    with_system = httpx.post(f"{daemon}/api/chat", json={"model": "assistant", "messages": [
        {"role": "user", "content": "What is the capital of Japan?"}]}, timeout=120).json()
    plain = httpx.post(f"{daemon}/api/chat", json={"model": "smollm2:135m", "options": {"max_tokens": 4}, "messages": [
        {"role": "user", "content": "What is the capital of Japan?"}]}, timeout=120).json()
    assert with_system["message"]["content"].strip()
    assert with_system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"], "the SYSTEM prompt was used"
    assert base["parameters"] == {}, "the base model is unchanged"
    # /v1 sees the same defaults: num_predict 256 caps the reply.
    v1 = httpx.post(f"{daemon}/v1/chat/completions", json={"model": "assistant", "messages": [
        {"role": "user", "content": "Write a very long essay about everything."}]}, timeout=120).json()
    assert v1["usage"]["completion_tokens"] <= 256


def test_create_gemma_chat_from_base_model(daemon: str) -> None:
    proc = myllm("create", "gemma3-chat", "-f", str(REPO / "modelfiles" / "gemma3-chat.Modelfile"))
    assert proc.returncode == 0, proc.stderr
    shown = myllm("show", "gemma3-chat", "--json").stdout
    assert "<start_of_turn>" in shown
    r = httpx.post(f"{daemon}/api/chat", json={"model": "gemma3-chat", "messages": [
        {"role": "user", "content": "What is the capital of France?"}], "options": {"seed": 1}}, timeout=120).json()
    reply = r["message"]["content"]
    assert reply.strip() and "<end_of_turn>" not in reply and "<start_of_turn>" not in reply
    assert r["usage"]["prompt_tokens"] > 60, "the seed MESSAGEs and SYSTEM are in the prompt"


@pytest.mark.parametrize(("text", "needle"), [
    ("PARAMETER temperature 0.5\n", "line 1: no FROM"),
    ("FROM smollm2:135m\nPARAMETR temperature 1\n", "line 2: unknown instruction 'PARAMETR'"),
    ("FROM smollm2:135m\n\nPARAMETER temperature hot\n", "line 3: invalid option 'temperature': Input should be a valid number"),
    ("FROM smollm2:135m\nPARAMETER warmth 1\n", "line 2: unknown PARAMETER 'warmth'"),
    ("FROM smollm2:135m\nPARAMETER logprobs 5\n", "line 2: unknown PARAMETER 'logprobs'"),  # a request's choice only
    ("FROM smollm2:135m\n" + 'PARAMETER stop "x"\n' * 17, "line 18: invalid option 'stop'"),
    ("FROM smollm2:135m\n# ok\nPARAMETER temperature 9\n", "line 3: invalid option 'temperature': must be <= 2.0"),
    ('FROM smollm2:135m\nSYSTEM """never\nends\n', 'line 2: unterminated """ block'),
    ('FROM smollm2:135m\nTEMPLATE """{% for m in messages %}"""\n', "line 2: TEMPLATE is not valid Jinja2"),
    ("FROM smollm2:135m\nMESSAGE wizard hi\n", "line 2: MESSAGE role must be one of"),
    ("FROM ./missing.gguf\n", "line 1: FROM './missing.gguf' is neither a registered model nor a file"),
])
def test_create_errors_name_the_line(private_home: Path, tmp_path: Path, text: str, needle: str) -> None:
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(text)
    proc = myllm("create", "bad", "-f", str(modelfile))
    assert proc.returncode == 1
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "bad:latest" not in myllm("list").stdout


def test_create_from_a_file(private_home: Path, tmp_path: Path, smollm2_path: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(smollm2_path)
    (tmp_path / "Modelfile").write_text('FROM ./model.gguf\nPARAMETER stop "User:"\nPARAMETER stop "###"\nLICENSE "MIT"\n')
    assert myllm("create", "fromfile", "-f", str(tmp_path / "Modelfile")).returncode == 0
    import json

    facts = json.loads(myllm("show", "fromfile", "--json").stdout)
    assert facts["parameters"] == {"stop": ["User:", "###"]} and facts["license"] == "MIT"


def test_run_pulls_a_catalog_model_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "fresh"
    monkeypatch.setenv("MYLLM_HOME", str(home))
    with running_server(Settings(home=home, num_threads=2)) as url:
        proc = myllm("run", "smollm2:135m", "Hi!", "--port", port_of(url))
        assert proc.returncode == 0, proc.stderr
        assert "copying" in proc.stderr and proc.stdout.strip()
        assert httpx.get(f"{url}/api/models/smollm2:135m").status_code == 200


def test_interactive_run_in_a_terminal(daemon: str) -> None:
    child = pexpect.spawn(MYLLM, ["run", "smollm2:135m", "--port", port_of(daemon)], env=os.environ.copy(),
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("Type /\\? for help")
        child.expect(">>> ")
        child.sendline("/?")
        child.expect("multi-line")
        child.expect(">>> ")
        child.sendline("/set parameter temperature 9")  # refused when set, by the daemon's own options model
        child.expect("invalid option 'temperature': must be <= 2.0")
        child.expect(">>> ")
        child.sendline("/set parameter temperature 0")
        child.expect("Set parameter 'temperature' to '0'")
        child.expect(">>> ")
        child.sendline("/set parameter max_tokens 24")
        child.expect(">>> ")
        child.sendline("My name is Ada.")
        child.expect(">>> ")
        first_reply = child.before
        assert first_reply.strip()

        child.sendline('"""What is')
        child.expect(r"\.\.\. ")
        child.sendline('my name?"""')
        child.expect(">>> ")

        child.sendline("/show info")
        child.expect("quantization")
        child.expect(">>> ")

        # Ctrl-C stops a long answer, not the program.
        child.sendline("/set parameter max_tokens 2000")
        child.expect(">>> ")
        child.sendline("/set parameter temperature 0")  # greedy: 2,000 tokens every run, still going at Ctrl-C
        child.expect(">>> ")
        child.sendline("Write a very long story about a dragon, with many chapters.")
        time.sleep(1.5)
        child.sendintr()
        child.expect(">>> ", timeout=30)
        child.sendline("/clear")
        child.expect("Cleared session context.")
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    sessions = httpx.get(f"{daemon}/api/sessions").json()["sessions"]
    ada = [s for s in sessions if s["model"] == "smollm2:135m" and s["message_count"] == 4]
    assert ada, "two completed turns in one session; the interrupted answer was not stored"
    messages = httpx.get(f"{daemon}/api/sessions/{ada[0]['id']}").json()["messages"]
    assert messages[2]["content"] == "What is\nmy name?"
