"""The two ends of a turn on a stored conversation that carries images, shared by the APIs that
store conversations (native sessions, Responses chains): the stored messages put back into the
next prompt as they were sent (images read from the blob store in their places), and the new
messages' images written to the blob store before their turn is stored by digest
(registry/session_images.py)."""

from __future__ import annotations

from typing import Any

from myllm.api.state import Services
from myllm.registry.session_images import Content, Parts, check_room, images_of, text_of, within_images
from myllm.registry.sessions import StoredMessage


async def earlier_messages(svc: Services, stored: list[StoredMessage], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored conversation's messages for a turn that sends `new` (the runtime's messages):
    those that fit beside them (`Runtime.recent`, and `within_images` of MYLLM_MAX_IMAGES), each
    with its images back in place, once the new images are found to fit the conversation's
    bound (MYLLM_MAX_SESSION_IMAGE_BYTES; a 400 otherwise)."""
    sent = [image for m in new for image in images_of(m["content"])]
    check_room((image for m in stored for _, image in m.images), sent, svc.settings.max_session_image_bytes)
    earlier = svc.runtime.recent([{"role": m.role, "content": m.parts} for m in stored], len(new))
    earlier = within_images(earlier, svc.settings.max_images - len(sent))
    if any(not isinstance(m["content"], str) for m in earlier):
        earlier = await svc.pools.blobs.run(svc.registry.images.inline, earlier)
    return earlier


async def kept_contents(svc: Services, contents: list[Content]) -> list[Parts]:
    """Contents of a turn to store: their images written to the blob store, each then named by
    its digest. Called once the runtime decoded them (a turn with a bad image is refused
    before it runs, so it never gets here)."""
    if not any(images_of(content) for content in contents):
        return [text_of(content) for content in contents]
    return await svc.pools.blobs.run(svc.registry.images.keep, contents)
