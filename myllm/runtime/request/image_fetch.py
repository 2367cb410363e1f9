"""Images a client names by `http(s)` URL, fetched by the daemon on its behalf (MYLLM_IMAGE_URLS).

A fetch the daemon makes wherever a client points it is a server-side request, the way into
whatever only the daemon's machine can reach. With `public`, only public addresses are reached:
the host is resolved here, every address it resolves to must be public (one private address
among them refuses the URL), and the connection goes to an address that was checked, the URL's
host sent as the `Host` header and as TLS's server name (virtual hosts and certificates work as
usual). Nothing resolves the name again, so a name that answers otherwise a moment later (DNS
rebinding) reaches nothing new. Each redirect (at most `MAX_REDIRECTS`) is a new URL, resolved
and checked the same way. No proxy from the environment is used: it, not the checked address,
would be connected to.

The whole fetch (resolving, connecting, redirects, the body) has one deadline
(MYLLM_IMAGE_URL_TIMEOUT). The body is read as sent (`Accept-Encoding: identity`, never
decompressed, so a small compressed body cannot grow past what was counted): a Content-Length
over MYLLM_MAX_IMAGE_BYTES is refused before any of it is read, and reading stops at the chunk
that passes the cap. httpx is imported at the first fetch: a daemon that never fetches an image
does not load it (as a daemon that never pulls from a hub does not, pull/hub.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from myllm.errors import BadImage, InvalidOptions
from myllm.runtime.request.images import Image, ImageURL

if TYPE_CHECKING:
    import ssl

    import httpx

Policy = Literal["off", "public", "any"]
"""MYLLM_IMAGE_URLS: fetch no URL, URLs whose addresses are public, any URL."""
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""A host and port to the addresses (text) to connect to, in order; `OSError` when it has none."""

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix: its addresses reach the IPv4 address in their last 32 bits."""
IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
"""IETF protocol assignments: not public, though Python 3.11 marks only parts of it private."""
HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "myllm"}


def is_public(address: Address) -> bool:
    """Whether `address` is on the public internet: not loopback, private, shared (carrier NAT),
    link-local, site-local, multicast, reserved, unspecified, documentation or benchmarking. An
    IPv6 address that carries an IPv4 one (IPv4-mapped `::ffff:a.b.c.d`, 6to4 `2002::/16`,
    NAT64 `64:ff9b::/96`) is judged by the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.is_site_local:
            return False
    special = (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
               or address.is_reserved or address.is_unspecified)
    return address.is_global and not special and address not in IETF_PROTOCOL


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the system resolver's order (getaddrinfo, which
    asyncio runs off the event loop); an address as the host resolves to itself."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ImageFetcher:
    """A request's images as bytes: the URLs among them fetched under the settings."""

    def __init__(self, policy: Policy, timeout: float, max_bytes: int, resolver: Resolver = resolve) -> None:
        self.policy = policy
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.resolver = resolver

    @cached_property
    def _tls(self) -> ssl.SSLContext:
        """Made at the first fetch (loading the CA bundle takes a while) and kept."""
        import httpx

        return httpx.create_ssl_context()

    async def fetch_all(self, images: list[Image]) -> list[bytes]:
        """`images` as bytes, in order; their URLs fetched at once (a request holds at most
        MYLLM_MAX_IMAGES), the first failure cancelling the others. `InvalidOptions` naming the
        setting when URLs are not fetched."""
        urls = [image for image in images if isinstance(image, ImageURL)]
        if not urls:
            return [image for image in images if isinstance(image, bytes)]
        if self.policy == "off":
            raise InvalidOptions("image URLs are not fetched (MYLLM_IMAGE_URLS is off): send the image inline as a "
                                 "data URI (data:image/png;base64,...), or have the daemon's admin set "
                                 "MYLLM_IMAGE_URLS=public", field=urls[0].field)
        tasks = [asyncio.ensure_future(self.fetch(url)) for url in urls]
        try:
            fetched = iter(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
        return [next(fetched) if isinstance(image, ImageURL) else image for image in images]

    async def fetch(self, image: ImageURL) -> bytes:
        """The body `image.url` answers with (following redirects), or a `BadImage` naming why
        not."""
        import httpx

        try:
            url = httpx.URL(image.url)
        except httpx.InvalidURL as exc:
            raise InvalidOptions(f"the image URL is not valid: {exc}", field=image.field) from None
        try:
            async with asyncio.timeout(self.timeout), httpx.AsyncClient(
                    verify=self._tls, trust_env=False, follow_redirects=False, timeout=self.timeout) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    got = await self._get(client, url, image.field)
                    if isinstance(got, bytes):
                        return got
                    url = got
        except (TimeoutError, httpx.TimeoutException):
            raise BadImage(f"fetching the image URL took more than {self.timeout:g} s (MYLLM_IMAGE_URL_TIMEOUT)",
                           "url_timeout", image.field) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # refused, reset, not HTTP, a TLS failure
            raise BadImage(f"fetching the image URL failed: {str(exc) or type(exc).__name__}", "url_unreachable",
                           image.field) from None
        raise BadImage(f"the image URL redirected more than {MAX_REDIRECTS} times", "too_many_redirects", image.field)

    async def _get(self, client: httpx.AsyncClient, url: httpx.URL, field: str) -> bytes | httpx.URL:
        """One hop: the body, or the URL it redirects to. Each of the host's (checked) addresses
        is tried in turn until one connects."""
        import httpx

        host = url.raw_host.decode("ascii")
        addresses = await self._addresses(host, url.port or (443 if url.scheme == "https" else 80), field)
        headers = {**HEADERS, "Host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if url.scheme == "https" and not _literal(host) else {}
        failure: httpx.ConnectError | None = None
        for address in addresses:
            try:
                got = await self._read(client, url.copy_with(host=address), headers, extensions, field)
                break
            except httpx.ConnectError as exc:
                failure = exc
        else:
            raise BadImage(f"could not connect to the image URL's host {host}: {failure}", "url_unreachable", field)
        if isinstance(got, bytes):
            return got
        try:
            target = url.join(got)
        except httpx.InvalidURL:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.raw_host:
            raise BadImage(f"the image URL redirected to {got[:200]!r}; only http(s) URLs are fetched", "bad_redirect",
                           field)
        return target

    async def _addresses(self, host: str, port: int, field: str) -> list[str]:
        """Where `host` is, each address public when the policy says so."""
        try:
            found = await self.resolver(host, port)
        except OSError as exc:
            raise BadImage(f"the image URL's host {host} could not be resolved ({exc.strerror or exc})",
                           "url_unreachable", field) from None
        if not found:
            raise BadImage(f"the image URL's host {host} has no address", "url_unreachable", field)
        if self.policy == "public":
            for address in found:
                if not is_public(ipaddress.ip_address(address)):
                    raise BadImage(f"the image URL's host {host} is at {address}, which is not a public address "
                                   "(MYLLM_IMAGE_URLS=public fetches from public addresses only)", "url_not_public",
                                   field)
        return found

    async def _read(self, client: httpx.AsyncClient, target: httpx.URL, headers: dict[str, str],
                    extensions: dict[str, str], field: str) -> bytes | str:
        """GET `target`: its body, or where a redirect points (a Location, as sent)."""
        async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
            location = response.headers.get("location")
            if response.status_code in REDIRECTS and location:
                return str(location)
            if response.status_code != 200:
                raise BadImage(f"the image URL answered {response.status_code} {response.reason_phrase}".rstrip(),
                               "url_status", field)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_big(f"{declared} bytes", field)
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.max_bytes:
                    raise self._too_big(f"more than {self.max_bytes} bytes", field)
            return bytes(body)

    def _too_big(self, size: str, field: str) -> BadImage:
        return BadImage(f"the image URL's body is {size}; at most {self.max_bytes} are allowed (MYLLM_MAX_IMAGE_BYTES)",
                        "too_many_bytes", field)
