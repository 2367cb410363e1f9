"""The Responses API's `input_image` with the official openai client against a real daemon, on a
vision model made from the vision fixture (tests/vision_fixture.py): `input_tokens` equal to
libmtmd's count of the prompt llama-server renders (tests/mtmd_reference.py), streamed and not;
a chain (`previous_response_id`) stores its images by digest, and a chained follow-up's prompt
holds the image again (the same prompt as the whole conversation sent at once), most of it
reused from the first turn's KV, image included.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import jinja2
import openai
import pytest

from myllm.create import create_model
from myllm.registry.session_images import ImageRef
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests import server
from tests.mtmd_reference import Reference
from tests.server import running_server
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:responses"
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[openai.OpenAI]:
    settings = Settings(home=tmp_path_factory.mktemp("vision-responses") / "home", num_threads=2, num_ctx=1024)
    registry = Registry.open(settings)
    try:
        create_model(registry, settings, MODEL, f"FROM {vision.text}\nFROM {vision.projector}\n", vision.text.parent)
    finally:
        registry.close()
    with running_server(settings) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def registry(client: openai.OpenAI) -> Registry:
    assert server.LAST_APP is not None
    return server.LAST_APP.state.services.registry  # type: ignore[no-any-return]


def data_uri(image: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(image).decode()}"


def asked(image: bytes | None, text: str = QUESTION) -> dict[str, Any]:
    """A user message of an `input_text` part and, after it, an `input_image` part."""
    parts: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
    if image is not None:
        parts.append({"type": "input_image", "image_url": data_uri(image), "detail": "auto"})
    return {"role": "user", "content": parts}


def test_input_image_counts_its_tokens_streamed_and_not(client: openai.OpenAI, registry: Registry,
                                                        reference: Reference) -> None:
    image = png_image(16, 16, seed=31)
    template = jinja2.Environment().from_string(registry.get(MODEL).template)
    prompt = template.render(messages=[{"role": "user", "content": QUESTION + reference.marker}],
                             add_generation_prompt=True, bos_token="", eos_token="")
    want = reference.run(prompt, [image], 0).n_tokens
    r = client.responses.create(model=MODEL, input=[asked(image)], max_output_tokens=8, temperature=0)  # type: ignore[list-item]
    assert r.output_text and r.usage is not None and r.usage.input_tokens == want
    events = list(client.responses.create(model=MODEL, input=[asked(image)], max_output_tokens=8, temperature=0,  # type: ignore[list-item]
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.input_tokens == want


def test_a_chained_follow_up_sees_the_image_stored_by_digest(client: openai.OpenAI, registry: Registry) -> None:
    image = png_image(24, 16, seed=32)
    first = client.responses.create(model=MODEL, input=[asked(image)], max_output_tokens=8, temperature=0)  # type: ignore[list-item]
    events = list(client.responses.create(model=MODEL, previous_response_id=first.id, input="And the colours?",
                                          max_output_tokens=8, temperature=0, stream=True))
    second = events[-1].response  # type: ignore[union-attr]
    whole = [asked(image), {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
             {"role": "user", "content": "And the colours?"}]
    at_once = client.responses.create(model=MODEL, input=whole, max_output_tokens=8, temperature=0)  # type: ignore[arg-type]
    text_only = client.responses.create(model=MODEL, input=[asked(None), *whole[1:]], max_output_tokens=8,  # type: ignore[list-item]
                                        temperature=0)
    assert first.usage and second.usage and at_once.usage and text_only.usage
    assert second.usage.input_tokens == at_once.usage.input_tokens
    assert second.usage.input_tokens >= text_only.usage.input_tokens + 5 * 4, "2x2 tiles and the overview"
    # The follow-up reused the first turn's KV through the image: all of the first prompt.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens

    services = server.LAST_APP.state.services  # type: ignore[union-attr]
    _, messages = services.responses.conversation(second.id)
    assert (messages[0].content, messages[0].images) == (
        QUESTION, ((len(QUESTION), ImageRef(hashlib.sha256(image).hexdigest(), len(image))),))
    assert registry.blobs.path(hashlib.sha256(image).hexdigest()).read_bytes() == image
    # Continued again from the first response, the chain forks, the image with it.
    fork = client.responses.create(model=MODEL, previous_response_id=first.id, input="And the colours?",
                                   max_output_tokens=8, temperature=0)
    assert fork.usage is not None and fork.usage.input_tokens == second.usage.input_tokens


@pytest.mark.parametrize(("part", "says", "code"), [
    ({"type": "input_image", "file_id": "file-abc"}, "file_id is not supported", "invalid_options"),
    ({"type": "input_image", "image_url": data_uri(b"not an image at all")}, "not an image", "invalid_image"),
    ({"type": "input_image", "detail": "auto"}, "image_url must be a string", "invalid_options"),
    ({"type": "input_file", "file_id": "file-abc"}, "only text and input_image parts", "invalid_options"),
])
def test_what_an_input_image_cannot_be_is_openais_400(client: openai.OpenAI, part: dict[str, Any], says: str,
                                                      code: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [part]}])  # type: ignore[list-item]
    assert says in info.value.message and info.value.code == code
