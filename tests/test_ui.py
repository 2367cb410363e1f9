"""The chat page in Debian's Chromium, driven by Playwright against a real daemon: answers
stream in, Stop stops them, sessions come back, stored markup stays text, keys work."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from myllm.settings import Settings
from tests.server import running_server
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def url(models_home: Path) -> Iterator[str]:
    with running_server(Settings(home=models_home, num_threads=2, num_ctx=2048)) as url:
        yield url


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        page = context.new_page()
        page.on("dialog", lambda dialog: dialog.dismiss())
        yield page
        browser.close()


def ask(page: Page, text: str, max_tokens: int) -> None:
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("textbox", name="Message").press("Enter")


def test_an_answer_streams_in_and_the_session_comes_back(url: str, page: Page, tmp_path: Path) -> None:
    response = page.goto(f"{url}/ui")
    assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    page.get_by_role("combobox", name="Model").select_option("smollm2:135m")
    ask(page, "Tell me about the sea.", 60)
    answer = page.locator("article[data-role=assistant]").last
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while not answer.locator(".stats").count() and time.monotonic() < deadline:
        text = answer.inner_text()
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.02)
    expect(answer.locator(".stats")).to_contain_text("tokens/s")
    assert len(seen) >= 3, f"only {len(seen)} updates before the end"
    page.screenshot(path=str(os.environ.get("MYLLM_UI_SCREENSHOT") or tmp_path / "ui.png"))
    final = answer.locator(".body").inner_text()

    page.reload()
    sessions = page.get_by_role("navigation", name="Sessions")
    sessions.get_by_role("button", name="Tell me about the sea.").first.click()
    expect(page.locator("article[data-role=user]")).to_have_text(["Tell me about the sea."])
    # `final` is innerText (paragraphs apart by blank lines); to_have_text reads textContent unless told.
    expect(page.locator("article[data-role=assistant] .body")).to_have_text([final], use_inner_text=True)


def test_stop_stops_the_answer(url: str, page: Page) -> None:
    page.goto(f"{url}/ui")
    page.get_by_role("button", name="New chat").click()
    ask(page, "Write a very long story about a lighthouse keeper.", 1500)
    answer = page.locator("article[data-role=assistant]").last
    expect(answer).not_to_have_text("", timeout=30_000)
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("status")).to_have_text("Stopped.")
    stopped = answer.inner_text()
    time.sleep(1.5)
    assert answer.inner_text() == stopped, "it grew after Stop"
    ps = httpx.get(f"{url}/api/ps").json()["models"]
    assert all(m["busy"] == 0 for m in ps), "the server still generates"


def test_stored_markup_shows_as_text_and_runs_nothing(url: str, page: Page) -> None:
    hostile = ("<script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\"> "
               "[click](javascript:window.pwned=3) **bold** `code`")
    made = httpx.post(f"{url}/api/chat", timeout=60, json={
        "model": "smollm2:135m", "messages": [{"role": "user", "content": hostile}], "options": {"max_tokens": 3}}).json()
    page.goto(f"{url}/ui")
    page.get_by_role("navigation", name="Sessions").locator(f"[data-session='{made['session_id']}']").click()
    user = page.locator("article[data-role=user]").first
    expect(user).to_contain_text("<script>window.pwned = 1</script>")
    expect(user).to_contain_text('<img src=x onerror="window.pwned = 2">')
    assert user.locator("script, img, a").count() == 0
    assert user.locator("strong").inner_text() == "bold" and user.locator("code").inner_text() == "code"
    assert page.evaluate("window.pwned") is None


def test_with_keys_the_page_asks_for_one(models_home: Path, page: Page) -> None:
    with running_server(Settings(home=models_home, num_threads=2, api_keys="page-key")) as url:
        page.goto(f"{url}/ui")
        page.get_by_label("API key").fill("page-key")
        page.get_by_role("button", name="Save key").click()
        expect(page.get_by_role("combobox", name="Model")).to_contain_text("smollm2:135m")
        ask(page, "Hi", 4)
        expect(page.locator("article[data-role=assistant] .stats")).to_contain_text("tokens")
