"""Images on the native API and in stored sessions: a vision model made from the vision fixture
(tests/vision_fixture.py), asked with `images` (base64, before the message's text) on chat and
generate, streamed and not; prompt token counts against libmtmd's count of llama-server's
rendering (tests/mtmd_reference.py). A session keeps its images as blobs of the store, named by
digest, where they were in their message: a later turn's prompt holds them again (the same
prompt as the whole conversation sent at once), after a restart and on a second daemon over the
same registry and blob store; `GET /api/sessions/{id}/images/{digest}` gives them back to whoever
may see the session. Bad images are the native 400 and store nothing; the blob store's clean-ups
keep what a session names, and a deleted session lets its images go. The store's side runs on
SQLite and on PostgreSQL (a throwaway cluster).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from sqlalchemy import func, select

from myllm.create import create_model
from myllm.errors import BadImage, SessionNotFound
from myllm.registry.schema import session_images, session_messages
from myllm.registry.session_images import GRACE, ImageRef, check_room, within_images
from myllm.registry.sessions import ADMIN as EVERYTHING
from myllm.registry.sessions import ResponseStore, SessionStore
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests import server
from tests.mtmd_reference import Reference
from tests.postgres import Cluster, throwaway_cluster
from tests.server import Daemon, running_server
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:sessions"
ADMIN, ALICE, BOB = "admin-key-0123456789", "alice-key-0123456789", "bob-key-0123456789"
QUESTION = "What is in this image?"
LIMIT = 96 * 1024
"""MYLLM_MAX_SESSION_IMAGE_BYTES of the module's daemon."""
GREEDY = {"temperature": 0, "max_tokens": 8}


def vision_home(home: Path, vision: VisionModel) -> Path:
    """A home whose registry holds the vision model (a Modelfile's two FROM lines)."""
    settings = Settings(home=home)
    registry = Registry.open(settings)
    try:
        create_model(registry, settings, MODEL, f"FROM {vision.text}\nFROM {vision.projector}\n", vision.text.parent)
    finally:
        registry.close()
    return home


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[str]:
    home = vision_home(tmp_path_factory.mktemp("vision-sessions") / "home", vision)
    settings = Settings(home=home, num_threads=2, num_ctx=1024, api_keys=ADMIN, inference_keys=f"{ALICE},{BOB}",
                        max_session_image_bytes=LIMIT)
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def registry(url: str) -> Registry:
    assert server.LAST_APP is not None
    return server.LAST_APP.state.services.registry  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def template(registry: Registry) -> jinja2.Template:
    return jinja2.Environment().from_string(registry.get(MODEL).template)


def llama_server_count(ref: Reference, template: jinja2.Template, content: str, images: list[bytes]) -> int:
    """Prompt tokens of one user turn (libmtmd's marker where each image goes), rendered as
    llama-server renders it (`--jinja`), with `images`."""
    prompt = template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True,
                             bos_token="", eos_token="")
    return ref.run(prompt, images, 0).n_tokens


def b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def digest(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(url: str, messages: list[dict[str, Any]], session: str | None = None, key: str = ALICE,
         **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "options": GREEDY, **extra}
    if session:
        body["session_id"] = session
    return httpx.post(f"{url}/api/chat", json=body, headers=as_key(key), timeout=120)


def answered(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def asked(image: bytes, text: str = QUESTION) -> dict[str, Any]:
    return {"role": "user", "content": text, "images": [b64(image)]}


def encoded(kind: str, size: tuple[int, int] = (12, 10)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(out, format=kind)
    return out.getvalue()


# -- images in, on the native API ---------------------------------------------------------------


def test_chat_with_an_image_counts_its_tokens_and_the_session_keeps_it_by_digest(
        url: str, registry: Registry, reference: Reference, template: jinja2.Template) -> None:
    image = png_image(16, 16, seed=11)
    want = llama_server_count(reference, template, reference.marker + QUESTION, [image])
    first = answered(chat(url, [asked(image)], session="seen"))
    assert first["message"]["content"] and first["usage"]["prompt_tokens"] == want

    with httpx.stream("POST", f"{url}/api/chat", headers=as_key(ALICE), timeout=120, json={
            "model": MODEL, "messages": [asked(image)], "options": GREEDY, "stream": True}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e.get("token", "") for e in events) == first["message"]["content"]
    assert events[-1]["done"] and events[-1]["usage"]["prompt_tokens"] == want

    detail = httpx.get(f"{url}/api/sessions/seen", headers=as_key(ALICE), timeout=30).json()
    assert [(m["role"], m["content"], m["images"]) for m in detail["messages"]] == [
        ("user", QUESTION, [digest(image)]), ("assistant", first["message"]["content"], [])]
    assert registry.blobs.path(digest(image)).read_bytes() == image
    with registry.engine.connect() as conn:  # the row holds the text and the digest, no base64
        [row] = conn.execute(select(session_messages.c.id).where(session_messages.c.content == QUESTION,
                                                                 session_messages.c.session_id.like("seen@%"))).all()
        images = conn.execute(select(session_images.c.digest, session_images.c.char_at, session_images.c.size)
                              .where(session_images.c.message_id == row.id)).all()
        assert images == [(digest(image), 0, len(image))]

    got = httpx.get(f"{url}/api/sessions/seen/images/{digest(image)}", headers=as_key(ALICE), timeout=30)
    assert got.status_code == 200 and got.content == image and got.headers["content-type"] == "image/png"


def test_a_later_turn_has_the_image_in_its_prompt(url: str) -> None:
    image = png_image(24, 16, seed=12)
    first = answered(chat(url, [asked(image)], session="later"))
    second = answered(chat(url, [{"role": "user", "content": "And the colours?"}], session="later"))
    whole = [asked(image), {"role": "assistant", "content": first["message"]["content"]},
             {"role": "user", "content": "And the colours?"}]
    at_once = answered(chat(url, whole))
    text_only = answered(chat(url, [{**m, "images": None} for m in whole]))
    assert second["usage"]["prompt_tokens"] == at_once["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens"] >= text_only["usage"]["prompt_tokens"] + 5 * 4  # 2x2 tiles + overview


def test_images_of_each_format_come_back_with_their_type_in_order(url: str) -> None:
    files = {"image/jpeg": encoded("JPEG"), "image/webp": encoded("WEBP"), "image/gif": encoded("GIF"),
             "image/png": png_image(8, 8, seed=13)}
    message = {"role": "user", "content": QUESTION, "images": [b64(f) for f in files.values()]}
    answered(chat(url, [message], session="formats"))
    [user, _] = httpx.get(f"{url}/api/sessions/formats", headers=as_key(ALICE), timeout=30).json()["messages"]
    assert user["images"] == [digest(f) for f in files.values()]
    for kind, data in files.items():
        got = httpx.get(f"{url}/api/sessions/formats/images/{digest(data)}", headers=as_key(ALICE), timeout=30)
        assert (got.status_code, got.headers["content-type"], got.content) == (200, kind, data)


def test_an_image_is_seen_only_by_who_sees_its_session(url: str) -> None:
    image = png_image(8, 8, seed=14)
    answered(chat(url, [asked(image)], session="mine"))
    path = f"/api/sessions/mine/images/{digest(image)}"
    assert httpx.get(url + path, headers=as_key(BOB), timeout=30).status_code == 404, "another key's session"
    assert httpx.get(url + path, headers=as_key(ADMIN), timeout=30).status_code == 404, "not the admin's own session"
    scoped = next(s["id"] for s in httpx.get(f"{url}/api/sessions", headers=as_key(ADMIN), timeout=30).json()["sessions"]
                  if s["id"].startswith("mine@"))
    admin = httpx.get(f"{url}/api/sessions/{scoped}/images/{digest(image)}", headers=as_key(ADMIN), timeout=30)
    assert admin.status_code == 200 and admin.content == image
    other = png_image(8, 8, seed=15)
    answered(chat(url, [asked(other)], session="theirs", key=BOB))
    for wrong in (digest(other), "0" * 64, "..%2F..%2Fmyllm.db", "sha256:" + digest(image)):
        r = httpx.get(f"{url}/api/sessions/mine/images/{wrong}", headers=as_key(ALICE), timeout=30)
        assert r.status_code == 404 and set(r.json()) == {"detail"}, wrong
    assert httpx.get(url + path, timeout=30).status_code == 401


def bmp() -> bytes:
    return encoded("BMP", (4, 4))


@pytest.mark.parametrize(("images", "says"), [
    (["%%%"], "not valid base64"),
    ([b64(b"not an image at all")], "not an image"),
    ([b64(bmp())], "BMP format are not supported"),
    ([b64(png_image(8, 8, seed=16))] * 9, "at most 8 are allowed"),
])
def test_bad_images_are_the_native_400_and_store_nothing(url: str, registry: Registry, images: list[str],
                                                         says: str) -> None:
    blobs = registry.blobs.digests()
    for route, body in (("chat", {"messages": [{"role": "user", "content": "Hi", "images": images}],
                                  "session_id": "bad"}),
                        ("generate", {"prompt": "Hi", "images": images})):
        r = httpx.post(f"{url}/api/{route}", headers=as_key(ALICE), timeout=60, json={"model": MODEL, **body})
        assert r.status_code == 400 and set(r.json()) == {"detail"} and says in r.json()["detail"], r.text
    assert httpx.get(f"{url}/api/sessions/bad", headers=as_key(ALICE), timeout=30).status_code == 404
    assert registry.blobs.digests() == blobs


def test_generate_takes_images_before_its_prompt(url: str, reference: Reference, template: jinja2.Template) -> None:
    first, second = png_image(16, 16, seed=17), png_image(32, 16, seed=18)
    want = llama_server_count(reference, template, reference.marker * 2 + QUESTION, [first, second])
    body = {"model": MODEL, "prompt": QUESTION, "images": [b64(first), b64(second)], "options": GREEDY}
    r = answered(httpx.post(f"{url}/api/generate", json=body, headers=as_key(ALICE), timeout=120))
    assert r["text"] and r["usage"]["prompt_tokens"] == want
    kept = httpx.post(f"{url}/api/generate", json={**body, "session_id": "gen"}, headers=as_key(ALICE), timeout=60)
    assert kept.status_code == 400 and "/api/chat" in kept.json()["detail"]


def test_a_session_holds_at_most_its_bound_of_image_bytes(url: str) -> None:
    big = [png_image(160, 128, seed=s) for s in (19, 20)]
    assert len(big[0]) < LIMIT < len(big[0]) + len(big[1])
    answered(chat(url, [asked(big[0])], session="full"))
    r = chat(url, [asked(big[1])], session="full")
    assert r.status_code == 400 and "MYLLM_MAX_SESSION_IMAGE_BYTES" in r.json()["detail"]
    history = httpx.get(f"{url}/api/sessions/full", headers=as_key(ALICE), timeout=30).json()["messages"]
    assert len(history) == 2, "the refused turn stored nothing"
    assert answered(chat(url, [{"role": "user", "content": "Go on"}], session="full"))["message"]["content"]


def test_deleting_a_session_lets_its_images_go_unless_another_holds_them(url: str, registry: Registry) -> None:
    own, shared = png_image(8, 8, seed=21), png_image(8, 8, seed=22)
    answered(chat(url, [asked(own)], session="gone"))
    answered(chat(url, [{"role": "user", "content": "Again", "images": [b64(shared)]}], session="gone"))
    answered(chat(url, [asked(shared)], session="stays"))
    for image in (own, shared):  # written over a minute ago: no turn is storing them now
        old = time.time() - GRACE - 5
        os.utime(registry.blobs.path(digest(image)), (old, old))
    assert httpx.delete(f"{url}/api/sessions/gone", headers=as_key(ALICE), timeout=30).status_code == 200
    assert not registry.blobs.exists(digest(own))
    assert registry.blobs.exists(digest(shared))
    got = httpx.get(f"{url}/api/sessions/stays/images/{digest(shared)}", headers=as_key(ALICE), timeout=30)
    assert got.status_code == 200 and got.content == shared


# -- a stored conversation with an image outlives its daemon -------------------------------------


def test_a_session_with_an_image_continues_after_a_restart_and_on_a_replica(tmp_path: Path, vision: VisionModel) -> None:
    home = vision_home(tmp_path / "home", vision)
    image = png_image(16, 24, seed=23)
    env = {"MYLLM_NUM_CTX": "1024"}
    first = Daemon(home, **env)
    try:
        turn1 = answered(chat(first.url, [asked(image)], session="trip"))
    finally:
        assert first.stop() == 0
    again, replica = Daemon(home, MYLLM_REPLICA_ID="again", **env), Daemon(home, MYLLM_REPLICA_ID="replica", **env)
    try:
        turn2 = answered(chat(again.url, [{"role": "user", "content": "Where?"}], session="trip"))
        turn3 = answered(chat(replica.url, [{"role": "user", "content": "When?"}], session="trip"))
        whole = [asked(image), {"role": "assistant", "content": turn1["message"]["content"]},
                 {"role": "user", "content": "Where?"}]
        assert turn2["usage"]["prompt_tokens"] == answered(chat(replica.url, whole))["usage"]["prompt_tokens"]
        whole += [{"role": "assistant", "content": turn2["message"]["content"]}, {"role": "user", "content": "When?"}]
        assert turn3["usage"]["prompt_tokens"] == answered(chat(again.url, whole))["usage"]["prompt_tokens"]
        text_only = answered(chat(again.url, [{**m, "images": None} for m in whole]))
        assert turn3["usage"]["prompt_tokens"] >= text_only["usage"]["prompt_tokens"] + 5 * 4, "the image is in it"
        got = httpx.get(f"{replica.url}/api/sessions/trip/images/{digest(image)}", timeout=30)
        assert got.status_code == 200 and got.content == image
    finally:
        for daemon in (again, replica):
            assert daemon.stop() == 0


# -- the store's side, on SQLite and PostgreSQL ---------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with throwaway_cluster() as c:
        yield c


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, smollm2_path: Path) -> Iterator[Registry]:
    """A registry (its blob store under `tmp_path`) over a fresh SQLite file or PostgreSQL database."""
    url = f"sqlite:///{tmp_path / 'r.db'}" if request.param == "sqlite" else request.getfixturevalue("cluster").new_database()
    settings = Settings(home=tmp_path / "home", database_url=url)
    registry = Registry.open(settings)
    yield registry
    registry.close()


def test_stored_parts_come_back_in_order_and_forks_keep_them(store: Registry) -> None:
    sessions, images = SessionStore(store.engine), store.images
    a, b = png_image(4, 4, seed=24), png_image(4, 4, seed=25)
    [parts] = images.keep([["Look: ", a, b, " and ", a, " end"]])
    assert parts == ["Look: ", ImageRef(digest(a), len(a)), ImageRef(digest(b), len(b)), " and ",
                     ImageRef(digest(a), len(a)), " end"]
    sessions.append_turn("s", "chat", MODEL, [("user", parts, 3), ("assistant", "ok", 1)])
    [user, reply] = sessions.history("s")
    assert (user.content, user.parts, reply.parts) == ("Look:  and  end", parts, "ok")
    assert images.inline([{"role": "user", "content": user.parts}])[0]["content"] == ["Look: ", a, b, " and ", a, " end"]

    responses = ResponseStore(store.engine)
    [first] = images.keep([[b, "What?"]])
    responses.store({"id": "r1"}, None, MODEL, [("user", first, 2), ("assistant", "Noise.", 1)])
    responses.store({"id": "r2"}, "r1", MODEL, [("user", "More?", 1), ("assistant", "No.", 1)])
    responses.store({"id": "r3"}, "r1", MODEL, [("user", "Other?", 1), ("assistant", "Yes.", 1)])  # forks r1's
    chains = {responses.conversation(r)[0] for r in ("r2", "r3")}
    assert len(chains) == 2
    for r in ("r2", "r3"):
        assert responses.conversation(r)[1][0].parts == first


def test_blob_clean_ups_keep_what_a_session_names(store: Registry, smollm2_path: Path) -> None:
    sessions, images = SessionStore(store.engine), store.images
    image = png_image(4, 4, seed=26)
    [parts] = images.keep([[image, "Hi"]])
    sessions.append_turn("s", "chat", MODEL, [("user", parts, 1)])
    old = time.time() - 3600
    os.utime(store.blobs.path(digest(image)), (old, old))
    assert store.sweep_unused_blobs(0) == [] and store.blobs.exists(digest(image)), "the sweep keeps a session's image"

    # A blob a model and a session both name outlives the model's rm (contrived: an image that is a GGUF).
    model = store.register("m:a", store.blobs.stage_copy(smollm2_path), "test")
    sessions.append_turn("t", "chat", MODEL, [("user", [ImageRef(model.digest, model.size), "?"], 1)])
    store.remove("m:a")
    assert store.blobs.exists(model.digest)

    # Deleting a session lets go of its images that nothing else names; a young one waits for the sweep.
    assert images.let_go(sessions.delete("s", EVERYTHING)) == [digest(image)]
    assert not store.blobs.exists(digest(image))
    assert images.let_go(sessions.delete("t")) == [], "just touched by the model's registration"
    assert store.sweep_unused_blobs(0) == [model.digest]
    with pytest.raises(SessionNotFound):
        sessions.image("t", model.digest)
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(session_images)) == 0, "the rows went with their messages"


def test_a_conversation_counts_every_image_against_its_bound() -> None:
    held = [ImageRef("a" * 64, 600), ImageRef("a" * 64, 600)]
    check_room(held, [b"x" * 800], 2000)
    with pytest.raises(BadImage) as info:
        check_room(held, [b"x" * 801], 2000)
    assert info.value.reason == "too_many_bytes" and info.value.status == 400


def test_the_oldest_stored_messages_give_way_to_the_images_a_prompt_may_hold() -> None:
    image = ImageRef("b" * 64, 10)
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user", "content": [image, "one"]}, {"role": "assistant", "content": "1"},
             {"role": "user", "content": [image, image, "two"]}, {"role": "assistant", "content": "2"}]
    assert within_images([system, *turns], 3) == [system, *turns]
    assert within_images([system, *turns], 2) == [system, *turns[1:]]
    assert within_images(turns, 1) == turns[3:] == within_images(turns, -1)
