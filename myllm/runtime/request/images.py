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

import hashlib
import io
from dataclasses import dataclass
from typing import NamedTuple

from myllm.errors import BadImage

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
