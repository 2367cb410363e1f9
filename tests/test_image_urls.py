"""Image URLs fetched by the daemon (MYLLM_IMAGE_URLS): a server-side request made on a client's
behalf, so `public` reaches public addresses only, checked on the address connected to and on
every redirect, within MYLLM_MAX_IMAGE_BYTES and MYLLM_IMAGE_URL_TIMEOUT.

A real HTTP server on a loopback port serves the cases (an image, a huge body declared and one
that never ends, a body that never comes, one that drips, redirect chains, a 404, a page that is
no image); the fetcher is driven directly, then a daemon with each setting is asked by the
OpenAI client, its vision model made by Ollama's create from the vision fixture's two files.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import ollama
import openai
import pytest

from myllm.errors import BadImage, InvalidOptions
from myllm.runtime.request import image_fetch
from myllm.runtime.request.image_fetch import MAX_REDIRECTS, ImageFetcher, is_public
from myllm.runtime.request.images import Image, ImageURL, from_url
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_servers
from tests.vision_fixture import VisionModel, png_image

IMAGE = png_image(16, 16, seed=5)
CAP = 64 * 1024
"""The fetcher's byte cap in the direct tests (the image is far below it)."""

# -- which addresses are public ------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "255.255.255.255", "224.0.0.1", "239.1.2.3", "240.0.0.1", "192.0.0.8", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fec0::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "2002:7f00:1::1", "2002:a00:1::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2001::1",
])
def test_private_and_special_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888", "2606:4700:4700::1111",
    "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808",
])
def test_public_addresses_are(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


# -- the URLs a request may give -------------------------------------------------------------------


def test_http_urls_become_image_urls_and_data_uris_bytes() -> None:
    assert from_url("https://example.com/cat.png", "f") == ImageURL("https://example.com/cat.png", "f")
    assert from_url("HTTP://example.com:8080/", "f") == ImageURL("HTTP://example.com:8080/", "f")
    assert from_url("data:image/png;base64," + base64.b64encode(IMAGE).decode(), "f") == IMAGE


@pytest.mark.parametrize("url", ["http://", "https:///x.png", "http://example.com:99999/", "http://example.com:x/",
                                 "http://example.com:0/", "ftp://example.com/x.png", "file:///etc/passwd",
                                 "gopher://127.0.0.1:6379/_", "//example.com/x.png"])
def test_other_urls_are_refused_at_once(url: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        from_url(url, "messages[0].content[1]")
    assert info.value.field == "messages[0].content[1]" and not isinstance(info.value, BadImage)


# -- a real HTTP server ---------------------------------------------------------------------------


class Site:
    """What the test server saw."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.stop = threading.Event()
        """Set at the end: the handlers that never finish a body return."""


Served = tuple[str, int, Site]
"""The test server's URL, port and what it saw."""


def handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def head(self, status: int, length: int | None, kind: str = "image/png", **extra: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            if length is not None:
                self.send_header("Content-Length", str(length))
            else:
                self.send_header("Connection", "close")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            site.hosts.append(self.headers["Host"])
            path = self.path
            try:
                if path == "/image.png":
                    self.head(200, len(IMAGE))
                    self.wfile.write(IMAGE)
                elif path.startswith("/redirect/"):
                    left = int(path.rsplit("/", 1)[1])
                    self.head(302, 0, Location=f"/redirect/{left - 1}" if left > 1 else "/image.png")
                elif path.startswith("/to/"):  # a redirect to the URL after /to/
                    self.head(307, 0, Location=path[len("/to/"):])
                elif path == "/declared-huge":
                    self.head(200, 1 << 40)
                    self.wfile.write(b"\x89PNG" * 1024)
                elif path in ("/endless", "/drip"):
                    self.head(200, None)
                    chunk = b"\0" * (65536 if path == "/endless" else 1)
                    while not site.stop.wait(0 if path == "/endless" else 0.05):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                elif path == "/silent":
                    self.head(200, len(IMAGE))
                    self.wfile.flush()
                    site.stop.wait()
                elif path == "/page.html":
                    body = b"<html><body>no image here</body></html>"
                    self.head(200, len(body), "text/html")
                    self.wfile.write(body)
                else:
                    self.head(404, 0, "text/plain")
            except OSError:  # the fetcher hung up, as it should past a cap or a deadline
                pass

    return Handler


@pytest.fixture(scope="module")
def site() -> Iterator[Served]:
    seen = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(seen))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = int(server.server_address[1])
    yield f"http://127.0.0.1:{port}", port, seen
    seen.stop.set()
    server.shutdown()
    server.server_close()


def fetch(fetcher: ImageFetcher, *images: Image) -> list[bytes]:
    return asyncio.run(fetcher.fetch_all(list(images)))


def refused(fetcher: ImageFetcher, url: str) -> BadImage:
    with pytest.raises(BadImage) as info:
        fetch(fetcher, ImageURL(url, "messages[0].content[0]"))
    assert info.value.field == "messages[0].content[0]"
    return info.value


@pytest.fixture
def anywhere() -> ImageFetcher:
    return ImageFetcher("any", 2.0, CAP)


def test_an_image_is_fetched_in_its_place_among_inline_ones(site: Served, anywhere: ImageFetcher) -> None:
    url, _, _ = site
    inline = png_image(4, 4)
    assert fetch(anywhere, inline, ImageURL(f"{url}/image.png", "a"), inline, ImageURL(f"{url}/redirect/2", "b")) == [
        inline, IMAGE, inline, IMAGE]


def test_redirects_are_followed_up_to_the_limit(site: Served, anywhere: ImageFetcher) -> None:
    url, _, _ = site
    assert fetch(anywhere, ImageURL(f"{url}/redirect/{MAX_REDIRECTS}", "f")) == [IMAGE]
    error = refused(anywhere, f"{url}/redirect/{MAX_REDIRECTS + 1}")
    assert error.reason == "too_many_redirects" and f"more than {MAX_REDIRECTS} times" in error.message
    error = refused(anywhere, f"{url}/to/file:///etc/passwd")
    assert error.reason == "bad_redirect" and "file:///etc/passwd" in error.message


def test_bodies_past_the_cap_are_refused_before_or_while_read(site: Served, anywhere: ImageFetcher) -> None:
    url, _, _ = site
    error = refused(anywhere, f"{url}/declared-huge")
    assert error.reason == "too_many_bytes" and str(1 << 40) in error.message
    error = refused(anywhere, f"{url}/endless")  # a body that never ends: read up to the cap, no further
    assert error.reason == "too_many_bytes" and f"more than {CAP} bytes" in error.message


def test_a_fetch_has_one_deadline_however_the_server_stalls(site: Served) -> None:
    url, _, _ = site
    quick = ImageFetcher("any", 0.5, CAP)
    for path in ("/silent", "/drip"):  # nothing after the head; a byte at a time, each within a read timeout
        error = refused(quick, f"{url}{path}")
        assert error.reason == "url_timeout" and "MYLLM_IMAGE_URL_TIMEOUT" in error.message


def test_statuses_and_dead_ports_are_named(site: Served, anywhere: ImageFetcher) -> None:
    url, _, _ = site
    error = refused(anywhere, f"{url}/missing.png")
    assert error.reason == "url_status" and "404 Not Found" in error.message
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    error = refused(anywhere, f"http://127.0.0.1:{dead}/image.png")
    assert error.reason == "url_unreachable" and "127.0.0.1" in error.message


def test_off_names_the_setting(site: Served) -> None:
    url, _, _ = site
    with pytest.raises(InvalidOptions) as info:
        fetch(ImageFetcher("off", 2.0, CAP), png_image(4, 4), ImageURL(f"{url}/image.png", "messages[1].content[2]"))
    assert "MYLLM_IMAGE_URLS" in info.value.message and info.value.field == "messages[1].content[2]"
    assert not isinstance(info.value, BadImage)


def test_public_refuses_loopback_however_it_is_written(site: Served) -> None:
    _, port, seen = site
    public = ImageFetcher("public", 2.0, CAP)
    before = len(seen.hosts)
    for host, address in [("127.0.0.1", "127.0.0.1"), ("localhost", ""), ("[::1]", "::1"),
                          ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"), ("2130706433", "127.0.0.1"),
                          ("127.1", "127.0.0.1")]:
        error = refused(public, f"http://{host}:{port}/image.png")
        assert error.reason == "url_not_public" and "MYLLM_IMAGE_URLS=public" in error.message
        assert f"is at {address}" in error.message
    assert len(seen.hosts) == before  # nothing was connected to


async def table(host: str, port: int) -> list[str]:
    """A resolver for names only the test knows (an address resolves to itself)."""
    names = {"127.0.0.1": ["127.0.0.1"], "images.test": ["127.0.0.1"], "mixed.test": ["93.184.216.34", "127.0.0.1"],
             "inside.test": ["10.0.0.7"], "second.test": ["127.0.0.2"]}
    if host not in names:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return names[host]


def test_a_name_is_resolved_once_and_the_connection_goes_to_that_address(site: Served) -> None:
    """The system resolver knows no `images.test`: the image comes because the connection goes
    to the address the check saw, with the URL's host as the Host header."""
    _, port, seen = site
    assert fetch(ImageFetcher("any", 2.0, CAP, table), ImageURL(f"http://images.test:{port}/image.png", "f")) == [IMAGE]
    assert seen.hosts[-1] == f"images.test:{port}"
    public = ImageFetcher("public", 2.0, CAP, table)
    for host, address in [("mixed.test", "127.0.0.1"), ("inside.test", "10.0.0.7"), ("images.test", "127.0.0.1")]:
        error = refused(public, f"http://{host}:{port}/image.png")
        assert error.reason == "url_not_public" and f"{host} is at {address}" in error.message
    error = refused(public, f"http://unknown.test:{port}/image.png")
    assert error.reason == "url_unreachable" and "could not be resolved" in error.message


def test_each_redirect_is_checked_again(site: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 127.0.0.1 taken for public, its server's redirect to a name at another loopback
    address is refused before anything connects there."""
    _, port, _ = site
    monkeypatch.setattr(image_fetch, "is_public", lambda address: address == ipaddress.ip_address("127.0.0.1"))
    public = ImageFetcher("public", 2.0, CAP, table)
    assert fetch(public, ImageURL(f"http://images.test:{port}/redirect/2", "f")) == [IMAGE]
    error = refused(public, f"http://images.test:{port}/to/http://second.test:{port}/image.png")
    assert error.reason == "url_not_public" and "second.test is at 127.0.0.2" in error.message


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The same server over TLS, its certificate (self-signed) for `images.test` alone."""
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    seen = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(seen))
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1]), cert
    seen.stop.set()
    server.shutdown()
    server.server_close()


def test_https_verifies_the_urls_host_on_the_address_checked(tls_site: tuple[int, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Connected to the address the resolver gave, TLS still names and verifies the URL's host
    (SNI): the certificate for images.test is accepted there, and is not one for 127.0.0.1."""
    port, cert = tls_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted by the fetcher's context, made at its first fetch
    fetcher = ImageFetcher("any", 5.0, CAP, table)
    assert fetch(fetcher, ImageURL(f"https://images.test:{port}/redirect/1", "f")) == [IMAGE]
    error = refused(fetcher, f"https://127.0.0.1:{port}/image.png")
    assert error.reason == "url_unreachable" and "certificate" in error.message.lower()


# -- through the daemon ------------------------------------------------------------------------------

MODEL = "smolvlm:urls"
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def home(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return writable_home(models_home, tmp_path_factory.mktemp("image-urls") / "home")


@pytest.fixture(scope="module")
def fetching(home: Path, vision: VisionModel) -> Iterator[openai.OpenAI]:
    """A daemon that fetches any URL, with the vision model created through it."""
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024, image_urls="any")) as (url, ollama_url):
        client = ollama.Client(host=ollama_url, timeout=120)
        files = {path.name: client.create_blob(path) for path in (vision.text, vision.projector)}
        assert [p.status for p in client.create(model=MODEL, files=files, stream=True)][-1] == "success"
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


def ask(client: openai.OpenAI, url: str) -> openai.types.chat.ChatCompletion:
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
    return client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": content}])  # type: ignore[misc]


@pytest.mark.slow
def test_an_image_url_counts_as_the_same_image_inline(fetching: openai.OpenAI, site: Served) -> None:
    url, _, _ = site
    inline = ask(fetching, "data:image/png;base64," + base64.b64encode(IMAGE).decode())
    fetched = ask(fetching, f"{url}/redirect/1")
    assert fetched.usage is not None and inline.usage is not None
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
    assert fetched.choices[0].message.content == inline.choices[0].message.content


@pytest.mark.slow
@pytest.mark.parametrize(("path", "says"), [
    ("/page.html", "not an image"), ("/missing.png", "404 Not Found"), ("/redirect/9", "redirected more than"),
])
def test_a_fetched_url_that_is_no_image_is_openais_400(fetching: openai.OpenAI, site: Served, path: str,
                                                       says: str) -> None:
    url, _, _ = site
    with pytest.raises(openai.BadRequestError) as info:
        ask(fetching, f"{url}{path}")
    assert says in info.value.message and info.value.code == "invalid_image"


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "says", "code"), [
    ("public", "is at 127.0.0.1, which is not a public address", "invalid_image"),
    ("off", "MYLLM_IMAGE_URLS is off", "invalid_options"),
])
def test_public_and_off_refuse_a_loopback_url(fetching: openai.OpenAI, home: Path, site: Served,
                                              policy: str, says: str, code: str) -> None:
    url, _, seen = site
    before = len(seen.hosts)
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024, image_urls=policy)) as (daemon, _):
        client = openai.OpenAI(base_url=f"{daemon}/v1", api_key="unused", timeout=120)
        with pytest.raises(openai.BadRequestError) as info:
            ask(client, f"{url}/image.png")
    assert says in info.value.message and info.value.code == code
    assert len(seen.hosts) == before


@pytest.mark.slow
def test_a_responses_chain_stores_a_fetched_image_as_its_bytes(fetching: openai.OpenAI, site: Served) -> None:
    """A stored turn keeps the bytes fetched, by digest: the follow-up's prompt holds the same
    image as the same chain started with the image inline."""
    url, _, _ = site

    def chain(image_url: str) -> tuple[int, int]:
        first = fetching.responses.create(model=MODEL, max_output_tokens=4, temperature=0, input=[{
            "role": "user", "content": [{"type": "input_text", "text": QUESTION},
                                        {"type": "input_image", "image_url": image_url, "detail": "auto"}]}])  # type: ignore[list-item]
        follow = fetching.responses.create(model=MODEL, max_output_tokens=4, temperature=0, input="And now?",
                                           previous_response_id=first.id)
        assert first.usage is not None and follow.usage is not None
        return first.usage.input_tokens, follow.usage.input_tokens

    inline = chain("data:image/png;base64," + base64.b64encode(IMAGE).decode())
    assert chain(f"{url}/redirect/1") == inline
