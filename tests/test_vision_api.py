"""Images in, through the daemon, with the official clients: a vision model made from the vision
fixture (tests/vision_fixture.py) by Ollama's create with two files, asked about images by
Ollama's `images` (chat and generate) and OpenAI's `image_url` data URIs, streamed and not.
The prompt token count is libmtmd's for the prompt llama-server renders for the same request
(the chat template run by Jinja with llama-server's media marker where the image goes; counted
by tests/mtmd_reference.py, which bench/vision_check.py shows equal to llama-server's). Bad
images are each API's own 400.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import jinja2
import ollama
import openai
import pytest

from myllm.registry.store import Registry
from myllm.settings import Settings
from tests import server
from tests.conftest import writable_home
from tests.mtmd_reference import Reference
from tests.server import running_servers
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:api"
QUESTION = "What is in this image?"
MAX_IMAGES = 2
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[tuple[str, str]]:
    home = writable_home(models_home, tmp_path_factory.mktemp("vision-api") / "home")
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024, max_images=MAX_IMAGES)) as urls:
        client = ollama.Client(host=urls[1], timeout=120)
        files = {path.name: client.create_blob(path) for path in (vision.text, vision.projector)}
        assert [p.status for p in client.create(model=MODEL, files=files, stream=True)][-1] == "success"
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


@pytest.fixture(scope="module")
def template(urls: tuple[str, str]) -> jinja2.Template:
    assert server.LAST_APP is not None
    registry: Registry = server.LAST_APP.state.services.registry
    return jinja2.Environment().from_string(registry.get(MODEL).template)


def llama_server_count(ref: Reference, template: jinja2.Template, content: str, images: list[bytes]) -> int:
    """Prompt tokens of one user turn whose content is `content` (libmtmd's marker where each
    image goes), rendered as llama-server renders it (`--jinja`), with `images`."""
    prompt = template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True,
                             bos_token="", eos_token="")
    return ref.run(prompt, images, 0).n_tokens


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "noise.png"
    path.write_bytes(png_image(16, 16, seed=1))
    return path


# -- Ollama ------------------------------------------------------------------------------------


def test_ollama_chat_with_an_image_path_counts_its_tokens(client: ollama.Client, reference: Reference,
                                                          template: jinja2.Template, image_file: Path) -> None:
    want = llama_server_count(reference, template, reference.marker + QUESTION, [image_file.read_bytes()])
    text_only = llama_server_count(reference, template, QUESTION, [])
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION, "images": [image_file]}], options=GREEDY)
    assert r.message.content and r.eval_count
    assert r.prompt_eval_count == want and want >= text_only + 5 * 4  # 2x2 tiles and the overview, 4 tokens each
    chunks = list(client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION, "images": [image_file]}],
                              options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == r.message.content
    assert chunks[-1].done and chunks[-1].prompt_eval_count == want


def test_ollama_generate_with_images_and_a_later_turn(client: ollama.Client, reference: Reference,
                                                      template: jinja2.Template, image_file: Path) -> None:
    second = png_image(64, 32, seed=2)
    want = llama_server_count(reference, template, reference.marker * 2 + QUESTION, [image_file.read_bytes(), second])
    r = client.generate(model=MODEL, prompt=QUESTION, images=[image_file, second], options=GREEDY)
    assert r.response and r.prompt_eval_count == want
    streamed = list(client.generate(model=MODEL, prompt=QUESTION, images=[image_file, second], options=GREEDY,
                                    stream=True))
    assert "".join(c.response for c in streamed) == r.response and streamed[-1].prompt_eval_count == want
    turns = [{"role": "user", "content": QUESTION, "images": [image_file]}, {"role": "assistant", "content": "Noise."},
             {"role": "user", "content": "And the colours?"}]
    later = client.chat(model=MODEL, messages=turns, options=GREEDY)
    assert later.message.content and later.prompt_eval_count > want - 3 * 4  # the first turn's image still counts


def bmp() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="BMP")
    return out.getvalue()


@pytest.mark.parametrize(("images", "says"), [
    ([b"not an image at all"], "not an image"),
    ([bmp()], "BMP format are not supported"),
    ([png_image(8, 8)] * (MAX_IMAGES + 1), f"at most {MAX_IMAGES} are allowed"),
])
def test_bad_images_are_ollamas_400(client: ollama.Client, images: list[bytes], says: str) -> None:
    for call in (lambda: client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi", "images": images}]),
                 lambda: client.generate(model=MODEL, prompt="Hi", images=images)):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 400 and says in info.value.error


def test_images_that_are_not_base64_are_a_400(urls: tuple[str, str]) -> None:
    import httpx

    r = httpx.post(f"{urls[1]}/api/generate", json={"model": MODEL, "prompt": "Hi", "images": ["%%%"], "stream": False})
    assert r.status_code == 400 and r.json() == {"error": "the image is not valid base64"}


# -- OpenAI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(urls: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", timeout=120)


def data_uri(image: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(image).decode()}"


def image_part(image: bytes) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": data_uri(image), "detail": "auto"}}


def test_openai_chat_with_a_data_uri_counts_its_tokens(oai: openai.OpenAI, reference: Reference,
                                                       template: jinja2.Template) -> None:
    image = png_image(8, 40, seed=3)
    want = llama_server_count(reference, template, QUESTION + reference.marker, [image])
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, image_part(image)]}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content and r.usage is not None and r.usage.prompt_tokens == want
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == want


@pytest.mark.parametrize(("part", "says", "code"), [
    (image_part(b"not an image at all"), "not an image", "invalid_image"),
    (image_part(bmp()), "BMP format are not supported", "invalid_image"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, "not valid base64", "invalid_image"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "image URLs are not fetched",
     "invalid_options"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "must be a data URI", "invalid_options"),
])
def test_bad_images_are_openais_400(oai: openai.OpenAI, part: dict[str, object], says: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [part]}])  # type: ignore[list-item]
    assert says in info.value.message and info.value.code == code


def test_too_many_images_and_a_model_that_cannot_see_are_openais_400(oai: openai.OpenAI) -> None:
    parts = [image_part(png_image(8, 8))] * (MAX_IMAGES + 1)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])  # type: ignore[misc]
    assert f"at most {MAX_IMAGES} are allowed" in info.value.message and info.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": parts[:1]}])  # type: ignore[misc]
    assert "does not support images" in info.value.message
