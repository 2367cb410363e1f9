"""`myllm run` with a vision model, run as a user runs it against a real daemon: a path to an image
file in a message (absolute, `~`, relative, quoted with a space, at the start of the line) is read,
taken out of the text and sent as the message's image, with Ollama's "Added image '...'" line; a
path that cannot be read is said and nothing is sent; a model that cannot see gets the path as
text. The model is the vision fixture, made by Ollama's create with two files (as
tests/test_vision_api.py makes it), and a greedy, short copy of it, so the CLI's answer can be
compared with the API's for the same image."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_servers
from tests.terminal import MYLLM, Terminal, environment, port_of
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:cli"
IMAGE = png_image(16, 16, seed=5)
DIGEST = hashlib.sha256(IMAGE).hexdigest()


@pytest.fixture(scope="module")
def url(models_home: Path, tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[str]:
    home = writable_home(models_home, tmp_path_factory.mktemp("vision-cli") / "home")
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024)) as (url, ollama_url):
        client = ollama.Client(host=ollama_url, timeout=120)
        files = {path.name: client.create_blob(path) for path in (vision.text, vision.projector)}
        made = client.create(model="smolvlm:base", files=files, parameters={"temperature": 0, "num_predict": 6})
        assert made.status == "success"
        yield url


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The working directory and HOME of the CLI: the image as pic.png, `my pics/pic.png`, and a
    .png that is text."""
    (tmp_path / "my pics").mkdir()
    for path in (tmp_path / "pic.png", tmp_path / "my pics" / "pic.png"):
        path.write_bytes(IMAGE)
    (tmp_path / "notes.png").write_text("not an image")
    return tmp_path


def api_chat(url: str, prompt: str, images: list[bytes]) -> tuple[str, str]:
    """The API's greedy answer to one message with `images`, and the session it stored."""
    message = {"role": "user", "content": prompt, "images": [base64.b64encode(i).decode() for i in images]}
    r = httpx.post(f"{url}/api/chat", json={"model": "smolvlm:base", "messages": [message]}, timeout=120).json()
    return r["message"]["content"], r["session_id"]


def sessions(url: str) -> set[str]:
    return {s["id"] for s in httpx.get(f"{url}/api/sessions").json()["sessions"]}


def user_messages(url: str, ids: set[str]) -> list[dict[str, object]]:
    return [m for i in ids for m in httpx.get(f"{url}/api/sessions/{i}").json()["messages"] if m["role"] == "user"]


def test_paths_in_the_chat_send_their_images(url: str, folder: Path) -> None:
    answer, _ = api_chat(url, "Describe please", [IMAGE])
    before = sessions(url)
    terminal = Terminal(url, "smolvlm:base", folder, columns=400)
    try:
        assert "A path to a .png, .jpg, .jpeg, .webp or .gif file in a message sends that image" in terminal.send("/?")
        for line, path in ((f"Describe {folder}/pic.png please", f"{folder}/pic.png"),
                           ("Describe ~/pic.png please", "~/pic.png"), ("Describe pic.png please", "pic.png"),
                           ("Describe 'my pics/pic.png' please", "my pics/pic.png"),
                           ("Describe my\\ pics/pic.png please", "my pics/pic.png")):
            assert terminal.send(line) == f"Added image '{path}'\n{answer}\n"
            terminal.send("/clear")  # each a fresh conversation, as the API's
        said = terminal.send(f"{folder}/pic.png what is this?")  # a message, not a command
        assert said.startswith(f"Added image '{folder}/pic.png'\n")
        terminal.send("/clear")

        nothing = "No such file or directory; nothing was sent.\n"
        assert terminal.send("Describe ~/missing.png") == f"Error: cannot read image '~/missing.png': {nothing}"
        assert terminal.send("/missing.png") == f"Error: cannot read image '/missing.png': {nothing}"
        assert terminal.send("/sett think") == "Unknown command '/sett think'. Type /? for help.\n"
        assert "Added image" not in terminal.send("Draw a logo.png")  # no such file, no path: a word
        said = terminal.send("Describe notes.png")  # the daemon's 400; the chat goes on
        assert said.startswith("Added image 'notes.png'\nError: ") and "not an image" in said, said
    finally:
        assert terminal.close() == 0
    messages = user_messages(url, sessions(url) - before)
    assert sorted(str(m["content"]) for m in messages) == ["Describe please"] * 5 + ["Draw a logo.png", "what is this?"]
    assert [m.get("images") for m in messages if m["content"] != "Draw a logo.png"] == [[DIGEST]] * 6


def myllm(url: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MYLLM, "run", *args, "--port", port_of(url)], capture_output=True, text=True, cwd=folder,
                          stdin=subprocess.DEVNULL, env=environment(folder), timeout=180)


def test_one_shot_sends_the_image_it_names(url: str, folder: Path) -> None:
    proc = myllm(url, folder, "smolvlm:base", "Describe ./pic.png please")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "Added image './pic.png'\n"
    assert proc.stdout == f"{api_chat(url, 'Describe please', [IMAGE])[0]}\n"

    proc = myllm(url, folder, "smolvlm:base", "Describe /nowhere/pic.png")
    assert proc.returncode == 1 and not proc.stdout
    assert "cannot read image '/nowhere/pic.png': No such file or directory; nothing was sent" in proc.stderr

    proc = myllm(url, folder, "smolvlm:base", "Describe notes.png")
    assert proc.returncode == 1 and "not an image" in proc.stderr


def test_a_model_that_cannot_see_gets_the_path_as_text(url: str, folder: Path) -> None:
    proc = myllm(url, folder, "smollm2:135m", "Describe ./pic.png")
    assert proc.returncode == 0 and proc.stdout.strip() and "Added image" not in proc.stderr
