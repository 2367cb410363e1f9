"""A thinking model on the chat page, in Debian's Chromium against a real daemon: its thinking
is folded above the answer (a <details>, open while it streams, closed once the answer
starts), the same as the native API returns it, again when the session is opened from the
list, always as text; a plain model's answer has none. The fixture models are those of
tests/test_thinking_api.py: SmolLM2 with a thinking template and a thinking budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_server
from tests.test_thinking_api import BUDGET, THINK_TEMPLATE
from tests.test_ui import ask
from tests.test_ui import page as page  # the fixture: Chromium with a fresh page

LONG_BUDGET = 30
"""Long enough for the thinking to quote the question's `<b>`."""
GREEDY = {"temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def url(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = writable_home(models_home, tmp_path_factory.mktemp("thinking-ui") / "home")
    registry = Registry.open(Settings(home=home))
    for name, budget in (("thinker", BUDGET), ("long-thinker", LONG_BUDGET)):
        registry.copy("smollm2:135m", name, Overrides(parameters={"thinking_budget": budget},
                                                      template_override=THINK_TEMPLATE))
    registry.close()
    with running_server(Settings(home=home, num_threads=2, num_ctx=1024)) as url:
        yield url


def native(url: str, model: str, text: str, **extra: object) -> dict[str, object]:
    """The native API's greedy answer to the request the page sends (it stores a session too)."""
    return httpx.post(f"{url}/api/chat", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": text}], "options": GREEDY, **extra}).json()["message"]


def session_ids(url: str) -> set[str]:
    return {s["id"] for s in httpx.get(f"{url}/api/sessions").json()["sessions"]}


def chat(page: Page, url: str, model: str, text: str, think: str = "Model's default") -> tuple[Locator, str]:
    """Asks `text` greedily on the page and waits for the whole answer; the answer's article and
    the session the page stored. The page records the <details>' `open` changes in `window.opens`."""
    before = session_ids(url)
    page.goto(f"{url}/ui")
    page.get_by_role("combobox", name="Model").select_option(model)
    page.get_by_role("combobox", name="Thinking").select_option(label=think)
    page.get_by_label("Temperature").fill("0")
    page.evaluate("""() => {
        window.opens = [];
        new MutationObserver((records) => { for (const r of records) window.opens.push(r.oldValue); })
            .observe(document.getElementById("messages"),
                     { subtree: true, attributeFilter: ["open"], attributeOldValue: true });
    }""")
    ask(page, text, GREEDY["max_tokens"])
    answer = page.locator("article[data-role=assistant]").last
    expect(answer.locator(".stats")).to_contain_text("tokens/s", timeout=120_000)
    (made,) = session_ids(url) - before
    return answer, made


def reopen(page: Page, session_id: str) -> Locator:
    page.reload()
    page.get_by_role("navigation", name="Sessions").locator(f"[data-session='{session_id}']").click()
    answer = page.locator("article[data-role=assistant]")
    expect(answer).to_have_count(1)
    return answer


def streamed_then_stored(page: Page, answer: Locator, session_id: str) -> Iterator[Locator]:
    """The answer as it streamed in, then as the session opened from the list shows it."""
    yield answer
    yield reopen(page, session_id)


def test_the_thinking_is_folded_above_the_answer_streamed_and_stored(url: str, page: Page) -> None:
    question = "What is two and two?"
    expected = native(url, "thinker:latest", question)
    assert expected["thinking"] and expected["content"]
    answer, made = chat(page, url, "thinker:latest", question)
    # made open while the thinking streamed in, then one change: closed (it was open, oldValue "")
    assert page.evaluate("window.opens") == [""]
    for shown in streamed_then_stored(page, answer, made):
        details = shown.locator("details.thinking")
        expect(details).to_have_count(1)
        expect(details.locator("summary")).to_have_text("Thinking")
        assert details.locator(".text").text_content() == expected["thinking"]
        assert not details.evaluate("d => d.open")  # folded
        expect(details.locator(".text")).to_be_hidden()
        expect(shown.locator("details.thinking + .body")).not_to_be_empty()  # the answer, below it
        assert shown.get_attribute("data-text") == expected["content"]  # the answer's text as the page got it
        details.locator("summary").click()
        expect(details.locator(".text")).to_be_visible()


def test_thinking_with_markup_shows_as_text(url: str, page: Page) -> None:
    question = "What does <b> mean in HTML?"
    thinking = str(native(url, "long-thinker:latest", question)["thinking"])
    assert "<b>" in thinking  # the greedy thinking quotes the tag
    answer, made = chat(page, url, "long-thinker:latest", question)
    for shown in streamed_then_stored(page, answer, made):
        text = shown.locator("details.thinking .text")
        assert text.text_content() == thinking
        assert "&lt;b&gt;" in text.inner_html()
        assert text.locator("*").count() == 0


def test_think_off_and_a_plain_model_show_no_thinking(url: str, page: Page) -> None:
    question = "What is two and two?"
    off = native(url, "thinker:latest", question, think=False)
    assert not off["thinking"]
    answer, _ = chat(page, url, "thinker:latest", question, think="Off")
    assert answer.get_attribute("data-text") == off["content"]
    assert answer.locator("details").count() == 0
    answer, made = chat(page, url, "smollm2:135m", question)
    expect(answer.locator(".body")).not_to_be_empty()
    assert answer.locator("details").count() == 0
    assert reopen(page, made).locator("details").count() == 0
