"""The document's JavaScript `fetch` streaming example, run in headless Chromium (Debian's
package, driven by Playwright; no browser download) from a page on another origin."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

# The 003 document's JavaScript example, with the base URL and model filled in, collecting
# what it would console.log.
PAGE = """<!doctype html><html><body><script>
window.chunks = [];
window.run = async (base) => {
const response = await fetch(base + '/api/chat', {
  method: 'POST',
  headers: {'Content-Type': 'application/json'},
  body: JSON.stringify({
    model: 'smollm2:135m',
    messages: [{role: 'user', content: 'Hello!'}],
    stream: true,
    options: {max_tokens: 48, temperature: 0.7, seed: 3}
  })
});

const reader = response.body.getReader();
const decoder = new TextDecoder();

while (true) {
  const {done, value} = await reader.read();
  if (done) break;

  const text = decoder.decode(value);
  window.chunks.push(text);
}
return window.chunks;
};
</script></body></html>"""


@pytest.fixture
def page_origin(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "index.html").write_text(PAGE)

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()


def test_document_fetch_example_streams_in_chromium(server: str, page_origin: str, tmp_path: Path) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{page_origin}/index.html")
            chunks = page.evaluate("base => window.run(base)", server)
        finally:
            browser.close()
    assert len(chunks) > 3, "the text arrived in several chunks"
    events = [json.loads(line[6:]) for line in "".join(chunks).splitlines() if line.startswith("data: ")]
    tokens = "".join(e["token"] for e in events if not e["done"])
    final = events[-1]
    assert final["done"] is True and final["full_text"] == tokens
    assert tokens
