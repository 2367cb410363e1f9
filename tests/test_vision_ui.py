"""Images on the chat page, in Debian's Chromium against a real daemon: the vision fixture made a
model by Ollama's create with two files (as tests/test_vision_api.py makes it). Images are
attached by the button, pasted and dropped (a ClipboardEvent and a DragEvent carrying a
DataTransfer built in the page), previewed and removable before sending, sent as the message's
`images` (base64, in order), counted in the prompt, shown in the conversation and again when the
stored session is opened; every image shown comes from an object URL, revoked when it leaves the
page. The daemon wants a key, so the stored images are fetched with the page's key too."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_servers
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:ui"
KEY = "vision-ui-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGE_BYTES = 16 << 10
RED, GREEN, BLUE = png_image(16, 16, seed=1), png_image(24, 16, seed=2), png_image(16, 32, seed=3)
TOO_BIG = png_image(80, 80, seed=4)
"""Random pixels do not compress: 19 KB, over the module's MYLLM_MAX_IMAGE_BYTES."""
GREEDY = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def url(models_home: Path, tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[str]:
    home = writable_home(models_home, tmp_path_factory.mktemp("vision-ui") / "home")
    settings = Settings(home=home, num_threads=2, num_ctx=1024, api_keys=KEY, max_image_bytes=MAX_IMAGE_BYTES)
    with running_servers(settings) as (url, ollama_url):
        client = ollama.Client(host=ollama_url, timeout=120, headers=AUTH)
        files = {path.name: client.create_blob(path) for path in (vision.text, vision.projector)}
        assert [p.status for p in client.create(model=MODEL, files=files, stream=True)][-1] == "success"
        yield url


@pytest.fixture
def page(url: str) -> Iterator[Page]:
    """The chat page with the key saved, the vision model chosen."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        context.add_init_script(f"localStorage.setItem('myllm-key', '{KEY}')")
        page = context.new_page()
        response = page.goto(f"{url}/ui")
        assert response is not None and "img-src 'self' blob:;" in response.headers["content-security-policy"]
        page.get_by_role("combobox", name="Model").select_option(MODEL)
        page.get_by_label("Temperature").fill("0")
        page.get_by_label("Max tokens").fill(str(GREEDY["max_tokens"]))
        yield page
        browser.close()


def b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def attach(page: Page, tmp_path: Path, name: str, image: bytes) -> None:
    """Through the Attach button and the file chooser it opens."""
    path = tmp_path / name
    path.write_bytes(image)
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Attach image").click()
    chooser.value.set_files(path)


MAKE_FILES = """([name, type, data]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, { type }));
    return transfer;
}"""


def paste(page: Page, name: str, image: bytes, kind: str = "image/png") -> None:
    page.evaluate(f"""(args) => document.getElementById("message").dispatchEvent(new ClipboardEvent("paste",
        {{ clipboardData: ({MAKE_FILES})(args), bubbles: true, cancelable: true }}))""", [name, kind, b64(image)])


def drop(page: Page, name: str, image: bytes) -> None:
    transfer = page.evaluate_handle(MAKE_FILES, [name, "image/png", b64(image)])
    composer = page.get_by_role("textbox", name="Message")
    composer.dispatch_event("dragover", {"dataTransfer": transfer})
    expect(page.locator("#composer")).to_have_class("dropping")
    composer.dispatch_event("drop", {"dataTransfer": transfer})


def previews(page: Page) -> Locator:
    return page.get_by_role("list", name="Images to send").locator("img")


def alts(page: Page) -> list[str]:
    return previews(page).evaluate_all("(images) => images.map((image) => image.alt)")


def expect_loaded(images: Locator, widths: list[int]) -> None:
    """Each image decoded (its blob: URL allowed by the CSP), at its own width."""
    expect(images).to_have_count(len(widths))
    for image, width in zip(images.all(), widths):
        expect(image).to_have_js_property("naturalWidth", width)
        assert image.get_attribute("src", timeout=1000).startswith("blob:")  # type: ignore[union-attr]


def revoked(page: Page, url: str) -> bool:
    return page.evaluate("(url) => fetch(url).then(() => false, () => true)", url)


def answered(page: Page) -> None:
    expect(page.locator("article[data-role=assistant]").last.locator(".stats")).to_contain_text("tokens", timeout=60_000)


def test_attached_pasted_and_dropped_images_are_previewed_removable_and_sent(page: Page, tmp_path: Path) -> None:
    attach(page, tmp_path, "red.png", RED)
    paste(page, "notes.txt", b"just text", "text/plain")
    expect(page.get_by_role("status")).to_have_text("Not a PNG, JPEG, WebP or GIF image: notes.txt")
    paste(page, "green.png", GREEN)
    drop(page, "blue.png", BLUE)
    expect(previews(page)).to_have_count(3)
    assert alts(page) == ["red.png", "green.png", "blue.png"]
    expect_loaded(previews(page), [16, 24, 16])

    gone = previews(page).nth(1).get_attribute("src")
    assert gone
    page.get_by_role("button", name="Remove green.png").click()
    expect(previews(page)).to_have_count(2)
    assert alts(page) == ["red.png", "blue.png"]
    assert revoked(page, gone)

    page.get_by_role("textbox", name="Message").fill("What is in these images?")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as request:
        page.get_by_role("button", name="Send").click()
    sent = request.value.post_data_json["messages"]
    assert sent == [{"role": "user", "content": "What is in these images?", "images": [b64(RED), b64(BLUE)]}]
    answered(page)
    expect(previews(page)).to_have_count(0)
    expect_loaded(page.locator("article[data-role=user] .images img"), [16, 16])  # the previews' URLs, kept


def test_the_image_counts_in_the_prompt_and_the_session_shows_it_again(url: str, page: Page, tmp_path: Path) -> None:
    question = "Describe the picture."
    direct = httpx.post(f"{url}/api/chat", headers=AUTH, timeout=120, json={
        "model": MODEL, "options": GREEDY, "messages": [{"role": "user", "content": question, "images": [b64(RED)]}]})
    text_only = httpx.post(f"{url}/api/chat", headers=AUTH, timeout=120, json={
        "model": MODEL, "options": GREEDY, "messages": [{"role": "user", "content": question}]})
    with_image = direct.json()["usage"]["prompt_tokens"]
    assert with_image > text_only.json()["usage"]["prompt_tokens"]

    attach(page, tmp_path, "red.png", RED)
    page.get_by_role("textbox", name="Message").fill(question)
    with page.expect_response(lambda r: r.url.endswith("/api/chat")) as response:
        page.get_by_role("button", name="Send").click()
    answered(page)
    events = [json.loads(line[6:]) for line in response.value.text().splitlines() if line.startswith("data: ")]
    assert events[-1]["usage"]["prompt_tokens"] == with_image
    shown = page.locator("article[data-role=user] .images img").get_attribute("src")
    assert shown

    session = page.locator("nav button[aria-current=true]").get_attribute("data-session")
    stored = httpx.get(f"{url}/api/sessions/{session}", headers=AUTH).json()["messages"]
    assert stored[0]["images"] == [hashlib.sha256(RED).hexdigest()]

    page.get_by_role("button", name="New chat").click()
    assert revoked(page, shown)
    page.get_by_role("navigation", name="Sessions").locator(f"[data-session='{session}']").click()
    expect(page.locator("article[data-role=user] .body")).to_have_text([question])
    expect_loaded(page.locator("article[data-role=user] .images img"), [16])  # fetched with the key
    expect(page.locator("#key-form")).to_be_hidden()


def test_a_model_that_cannot_see_takes_no_images(page: Page, tmp_path: Path) -> None:
    page.get_by_role("combobox", name="Model").select_option("smollm2:135m")
    expect(page.get_by_role("button", name="Attach image")).to_be_disabled()
    paste(page, "red.png", RED)
    expect(page.get_by_role("status")).to_have_text("smollm2:135m does not take images.")
    expect(previews(page)).to_have_count(0)
    page.get_by_role("combobox", name="Model").select_option(MODEL)
    expect(page.get_by_role("button", name="Attach image")).to_be_enabled()


def test_the_servers_refusals_show(page: Page, tmp_path: Path) -> None:
    """Attached, then a model that cannot see chosen; an image over MYLLM_MAX_IMAGE_BYTES."""
    attach(page, tmp_path, "red.png", RED)
    page.get_by_role("combobox", name="Model").select_option("smollm2:135m")
    page.get_by_role("textbox", name="Message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Error: .*does not support images"))

    page.get_by_role("combobox", name="Model").select_option(MODEL)
    attach(page, tmp_path, "big.png", TOO_BIG)
    page.get_by_role("textbox", name="Message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("status")).to_have_text(re.compile(rf"^Error: .*at most {MAX_IMAGE_BYTES} are allowed"))
