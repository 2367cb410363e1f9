"""Images a client sent, checked and decoded to raw RGB before any model is involved.

Decoding happens here, on the daemon's side, and never in a runner: a bad image is the API's
400 before a model is chosen or loaded; a runner imports no image library and parses no file
format a client chose (libmtmd's own decoder, which hands bytes it does not know to ffmpeg, is
never reached: what crosses is a width, a height and pixels whose length is checked); and the
digest that names the image is taken where sessions store it. Pillow reads the header first, so
the pixel cap holds before anything is decompressed (a small PNG that would decode to gigabytes
costs nothing), and only the formats every vision runtime takes are opened.

The pixels are what llama-server's decoder (stb_image) gives for the same file: the first frame
of an animation, alpha dropped, no EXIF rotation, so prompt token counts match it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from myllm.errors import BadImage, InvalidOptions

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
"""Pillow's names of the formats decoded (JPEG's opener also takes MPO, the variant many cameras
write)."""


class Pixels(NamedTuple):
    """A decoded image: `engine_types.DecodedImage(*pixels)` is what crosses to a runner (this
    layer does not import the types the runner shares)."""

    digest: str
    """The sha256 (hex) of the bytes as sent."""
    width: int
    height: int
    rgb: bytes


@dataclass(frozen=True)
class ImageLimits:
    """The settings that bound a request's images (`MYLLM_MAX_IMAGE_BYTES`,
    `MYLLM_MAX_IMAGE_PIXELS`, `MYLLM_MAX_IMAGES`)."""

    max_bytes: int
    max_pixels: int
    max_images: int


def check_count(count: int, limits: ImageLimits) -> None:
    """Before decoding any: a request with more images than the limit is refused whole."""
    if count > limits.max_images:
        raise BadImage(f"{count} images in one request; at most {limits.max_images} are allowed", "too_many_images")


def decode_image(data: bytes, limits: ImageLimits) -> Pixels:
    """An image file's bytes as RGB pixels, or `BadImage` naming what is wrong with them."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise BadImage(f"an image of {len(data)} bytes; at most {limits.max_bytes} are allowed", "too_many_bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own cap (far above ours) checks the header too
        raise BadImage(f"an image of more than {limits.max_pixels} pixels", "too_many_pixels") from None
    except Exception:  # any parser's complaint about bytes no allowed format reads
        raise _unreadable(data) from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise BadImage(f"an image of {width}x{height} pixels; at most {limits.max_pixels} pixels are allowed",
                           "too_many_pixels")
        try:
            rgb = image.convert("RGB").tobytes()  # the first frame
        except Exception:  # truncated or corrupt past its header
            raise BadImage(f"the {image.format} image could not be decoded (truncated or corrupt)",
                           "not_an_image") from None
    return Pixels(hashlib.sha256(data).hexdigest(), width, height, rgb)


def _unreadable(data: bytes) -> BadImage:
    """Why no allowed format opened `data`: another image format Pillow knows (only its header
    is read, to name it), or not an image at all."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as other:
            kind = other.format
    except Exception:  # no format's header matches: not an image
        kind = None
    if kind is None:
        return BadImage("the data is not an image (PNG, JPEG, WebP or GIF)", "not_an_image")
    return BadImage(f"images in {kind} format are not supported; send PNG, JPEG, WebP or GIF", "unsupported_format")


def from_base64(text: str) -> bytes:
    """An image sent as base64 text (Ollama's `images`, a data URI's payload, Anthropic's
    `source.data`): its bytes, or `not_an_image` when the text is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("the image is not valid base64", "not_an_image") from None


@dataclass(frozen=True)
class ImageURL:
    """An image a client named by an `http(s)` URL: fetched by the runtime, on the event loop,
    when the request is prepared (`image_fetch.ImageFetcher`, under MYLLM_IMAGE_URLS), then
    decoded as the bytes sent inline are."""

    url: str
    field: str
    """Where the request sent it (for the 400 a failed fetch is)."""


Image = bytes | ImageURL
"""An image as a request gives it: the file's bytes, or where to fetch them."""


def from_url(url: str, field: str) -> Image:
    """An image given by URL (OpenAI's `image_url`, the Responses API's `input_image`,
    Anthropic's `url` source): a `data:` URI's base64 payload, or an `http(s)` URL to fetch
    (whether it is fetched is the runtime's setting, MYLLM_IMAGE_URLS)."""
    parts = urlsplit(url)
    if parts.scheme.lower() in ("http", "https"):
        try:
            port_ok = parts.port is None or 0 < parts.port  # a port that is not a number raises
        except ValueError:
            port_ok = False
        if not parts.hostname or not port_ok:
            raise InvalidOptions("an image URL must name a host and, if any, a port from 1 to 65535", field=field)
        return ImageURL(url, field)
    head, comma, payload = url.partition(",")
    if not head.startswith("data:") or not comma:
        raise InvalidOptions("an image URL must be a data URI (data:image/png;base64,...) or an http(s) URL",
                             field=field)
    if not head.endswith(";base64"):
        raise InvalidOptions("an image data URI must be base64 (data:image/png;base64,...)", field=field)
    return from_base64(payload)


Content = str | list[str | Image]
"""A message's content as the runtime takes it: text, or pieces of text and images (an image
file's bytes, or an `ImageURL`) in their order, joined as they are (an API that separates its
parts says so with its own text pieces)."""

MEDIA_MARKER = "<__media__>"
"""What stands for an image in a prompt's text as shown (libmtmd's and llama-server's marker)."""


class Markers:
    """Where a request's images go in its prompt. Each image becomes a marker in its message's
    text, random per request (a client cannot write one), numbered by the image's place in the
    request; the chat template renders the text around them, and the rendered prompt is cut at
    the markers, so each image lands exactly where the template put its message's content."""

    @functools.cached_property
    def _nonce(self) -> str:
        """Drawn at the first image: every chat request places its messages, most have none, and
        a fresh pattern is a regex compile the `re` cache cannot save."""
        return secrets.token_hex(6)

    @functools.cached_property
    def _format(self) -> str:
        return f"\ue003{self._nonce}{{}}\ue003"

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(f"\ue003{self._nonce}(\\d+)\ue003")

    def place(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image]]:
        """The messages with each content as text (markers where the images were), and the
        images in the order of their markers. A content that is neither text nor a list of text
        and images is left for the message check to refuse."""
        files: list[Image] = []
        placed = []
        for msg in messages:
            content = msg.get("content")
            if isinstance(content, list):
                text = []
                for piece in content:
                    if isinstance(piece, bytes | ImageURL):
                        text.append(self._format.format(len(files)))
                        files.append(piece)
                    else:
                        text.append(piece)
                if all(isinstance(piece, str) for piece in text):
                    msg = {**msg, "content": "".join(text)}
            placed.append(msg)
        return placed, files

    def split(self, text: str) -> list[str | int]:
        """`text` cut at the markers: its pieces of text (empty ones left out) and, between
        them, the number of the image each marker stands for."""
        out: list[str | int] = []
        pos = 0
        for match in self._pattern.finditer(text):
            if match.start() > pos:
                out.append(text[pos:match.start()])
            out.append(int(match.group(1)))
            pos = match.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def count(self, text: str) -> list[int]:
        """The images whose markers are in `text`, in order."""
        return [int(m.group(1)) for m in self._pattern.finditer(text)]

    def shown(self, text: str) -> str:
        """`text` with `MEDIA_MARKER` for each image."""
        return self._pattern.sub(MEDIA_MARKER, text)
