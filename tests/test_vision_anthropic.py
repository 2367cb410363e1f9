"""Images in through Anthropic's Messages API (the official `anthropic` client: base64 image
blocks, streamed and not, in a user turn and in a tool result; `count_tokens`) and LangChain's
`ChatOllama` (an `image_url` part, which it sends as Ollama's `images`), on the vision model
made from the vision fixture by Ollama's create with two files. Prompt token counts are libmtmd's
for llama-server's rendering of the same turn (tests/test_vision_api.py's `llama_server_count`).
Bad images are Anthropic's 400 `invalid_request_error`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jinja2
import ollama
import pytest
from anthropic.types import Message

from myllm.registry.store import Registry
from myllm.settings import Settings
from tests import server
from tests.conftest import writable_home
from tests.mtmd_reference import Reference
from tests.server import running_servers
from tests.test_vision_api import bmp, llama_server_count
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:anthropic"
QUESTION = "What is in this image?"
MAX_IMAGES = 2
MAX_BYTES = 64 << 10
MAX_PIXELS = 256 * 256
GREEDY = {"temperature": 0}
"""Greedy decoding; the client no longer takes `temperature` as an argument (myllm still reads it)."""


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[tuple[str, str]]:
    home = writable_home(models_home, tmp_path_factory.mktemp("vision-anthropic") / "home")
    settings = Settings(home=home, num_threads=2, num_ctx=1024, max_images=MAX_IMAGES, max_image_bytes=MAX_BYTES,
                        max_image_pixels=MAX_PIXELS)
    with running_servers(settings) as urls:
        client = ollama.Client(host=urls[1], timeout=120)
        files = {path.name: client.create_blob(path) for path in (vision.text, vision.projector)}
        assert [p.status for p in client.create(model=MODEL, files=files, stream=True)][-1] == "success"
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=urls[0], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def template(urls: tuple[str, str]) -> jinja2.Template:
    assert server.LAST_APP is not None
    registry: Registry = server.LAST_APP.state.services.registry
    return jinja2.Environment().from_string(registry.get(MODEL).template)


def image_block(image: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(image).decode()}}


def input_tokens(message: Message) -> int:
    """The whole prompt's tokens: Anthropic's `input_tokens` leaves out those read from the cache."""
    return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


# -- Anthropic ---------------------------------------------------------------------------------


def test_a_base64_image_block_is_answered_and_counted(client: anthropic.Anthropic, reference: Reference,
                                                      template: jinja2.Template) -> None:
    image = png_image(24, 16, seed=11)
    want = llama_server_count(reference, template, reference.marker + QUESTION, [image])
    text_only = llama_server_count(reference, template, QUESTION, [])
    messages: Any = [{"role": "user", "content": [image_block(image), {"type": "text", "text": QUESTION}]}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens == want and want >= text_only + 5 * 4  # 2x2 tiles and the overview, 4 tokens each
    r = client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=messages)
    assert r.content and r.content[0].type == "text" and r.content[0].text
    assert input_tokens(r) == want and r.usage.output_tokens > 0
    with client.messages.stream(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=messages) as stream:
        events = list(stream)
        final = stream.get_final_message()
    streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert streamed == r.content[0].text and input_tokens(final) == want
    [start] = [e for e in events if e.type == "message_start"]
    assert start.message.usage.input_tokens == want  # the image's tokens counted from the first event


def test_images_among_text_blocks_go_where_they_are(client: anthropic.Anthropic, reference: Reference,
                                                    template: jinja2.Template) -> None:
    first, second = png_image(16, 16, seed=12), png_image(40, 8, seed=13)
    content = f"Two pictures.{reference.marker}{reference.marker}{QUESTION}"  # text blocks apart are paragraphs
    want = llama_server_count(reference, template, content, [first, second])
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "Two pictures."}, image_block(first),
                                                  image_block(second), {"type": "text", "text": QUESTION}]}]
    r = client.messages.create(model=MODEL, max_tokens=4, extra_body=GREEDY, messages=messages)
    assert input_tokens(r) == want
    assert client.messages.count_tokens(model=MODEL, messages=messages).input_tokens == want


def test_an_image_in_a_tool_result_counts(client: anthropic.Anthropic) -> None:
    tool = {"name": "camera", "description": "Takes a picture.", "input_schema": {"type": "object", "properties": {}}}

    def turns(result: list[dict[str, Any]]) -> Any:
        return [{"role": "user", "content": "Take a picture."},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "camera", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result},
                                             {"type": "text", "text": QUESTION}]}]

    with_image = turns([{"type": "text", "text": "Here it is."}, image_block(png_image(16, 16, seed=14))])
    without = client.messages.count_tokens(model=MODEL, tools=[tool],  # type: ignore[list-item]
                                           messages=turns([{"type": "text", "text": "Here it is."}])).input_tokens
    counted = client.messages.count_tokens(model=MODEL, tools=[tool], messages=with_image).input_tokens  # type: ignore[list-item]
    assert counted >= without + 5 * 4
    r = client.messages.create(model=MODEL, max_tokens=4, extra_body=GREEDY, tools=[tool], messages=with_image)  # type: ignore[list-item]
    assert input_tokens(r) == counted


def solid_png(width: int, height: int) -> bytes:
    """Many pixels in few bytes (one colour compresses to almost nothing)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize(("blocks", "says"), [
    ([image_block(b"not an image at all")], "not an image"),
    ([image_block(bmp())], "BMP format are not supported"),
    ([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}], "not valid base64"),
    ([image_block(png_image(160, 160, seed=15))], f"at most {MAX_BYTES} are allowed"),
    ([image_block(solid_png(300, 300))], f"at most {MAX_PIXELS} pixels are allowed"),
    ([image_block(png_image(8, 8))] * (MAX_IMAGES + 1), f"at most {MAX_IMAGES} are allowed"),
    ([image_block(jpeg())], "specified using the image/png media type, but the image appears to be a image/jpeg image"),
    ([image_block(png_image(8, 8), "image/bmp")], "Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"),
    ([{"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}], "must be a data URI"),
    ([{"type": "image", "source": {"type": "file", "file_id": "file_1"}}], "source"),
])
def test_bad_images_are_anthropics_400(client: anthropic.Anthropic, blocks: list[dict[str, Any]], says: str) -> None:
    messages: Any = [{"role": "user", "content": [*blocks, {"type": "text", "text": "Hi"}]}]
    for call in (lambda: client.messages.create(model=MODEL, max_tokens=4, messages=messages),
                 lambda: client.messages.count_tokens(model=MODEL, messages=messages)):
        with pytest.raises(anthropic.BadRequestError) as info:
            call()
        error = info.value.body["error"]  # type: ignore[index]
        assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and says in error["message"], error


def test_a_data_uri_by_url_is_an_image_and_a_model_that_cannot_see_says_so(client: anthropic.Anthropic) -> None:
    image = png_image(16, 16, seed=16)
    by_url = {"type": "image", "source": {"type": "url", "url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}}
    inline = [{"role": "user", "content": [image_block(image), {"type": "text", "text": QUESTION}]}]
    linked = [{"role": "user", "content": [by_url, {"type": "text", "text": QUESTION}]}]
    assert (client.messages.count_tokens(model=MODEL, messages=linked).input_tokens  # type: ignore[arg-type]
            == client.messages.count_tokens(model=MODEL, messages=inline).input_tokens)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="smollm2:135m", max_tokens=4, messages=inline)  # type: ignore[arg-type]
    assert "does not support images" in info.value.body["error"]["message"]  # type: ignore[index]


def test_an_assistant_turn_cannot_hold_an_image(client: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": [image_block(png_image(8, 8))]}]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=4, messages=messages)
    assert "an assistant turn cannot hold image blocks" in info.value.body["error"]["message"]  # type: ignore[index]


# -- LangChain's ChatOllama --------------------------------------------------------------------


def test_langchain_chat_ollama_with_an_image_part(urls: tuple[str, str], reference: Reference,
                                                  template: jinja2.Template) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_ollama import ChatOllama

    image = png_image(32, 24, seed=17)
    # ChatOllama sends the text parts each after a newline, the images apart (Ollama's `images`,
    # which go before the text)
    want = llama_server_count(reference, template, reference.marker + "\n" + QUESTION, [image])
    llm = ChatOllama(model=MODEL, base_url=urls[1], temperature=0, num_predict=8)
    message = HumanMessage(content=[{"type": "text", "text": QUESTION},
                                    {"type": "image_url", "image_url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}])
    answer = llm.invoke([message])
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata and answer.usage_metadata["input_tokens"] == want
    chunks = list(llm.stream([message]))
    assert "".join(str(c.content) for c in chunks) == answer.content
    assert sum((c.usage_metadata or {}).get("input_tokens", 0) for c in chunks) == want
