"""Issue 27, cases 3 and 4: blocking work on bounded pools of its own, bounded uploads, and chat
templates that cannot build more than their bounds.

Case 3: uploads that stall held every thread of the one pool every route shared, so every route
that reads the registry froze. Now each kind of blocking work has its own pool (myllm/pools.py),
an upload holds a slot but no thread, and stalls, sizes and unused blobs are bounded.
Case 4: a template could allocate gigabytes (`'%0400000000d' % 0`, `ljust`, a doubling loop)
before the output bound applied, and one that explodes only past one message was registered.
Now every operation is sized before it builds (myllm/registry/template_limits.py) and
`check_template` renders several conversations.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from myllm.errors import InvalidOptions, Overloaded, StagingFull, UploadStalled, UploadTooLarge
from myllm.pools import Pool
from myllm.registry import template_limits
from myllm.registry.chat_templates import Deadline, check_template
from myllm.registry.store import Registry
from myllm.registry.uploads import Uploads
from myllm.runtime.request.template import CHATML, GEMMA, render_chat
from myllm.settings import Settings
from tests.hostile import ADMIN, BOB, MODEL, Hostile, hostile_daemon, key, still_answering

MiB = 1 << 20


# -- pools ------------------------------------------------------------------------------------


def test_a_full_pool_refuses_and_never_takes_another_pools_threads() -> None:
    async def scenario() -> None:
        stuck, other = Pool("stuck", threads=2, max_waiting=1), Pool("other", threads=1, max_waiting=0)
        release = threading.Event()
        held = [asyncio.ensure_future(stuck.run(release.wait)) for _ in range(3)]  # two run, one waits
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded):
            await stuck.run(time.sleep, 0)
        assert await asyncio.wait_for(other.run(lambda: 42), 5) == 42  # the other pool still answers
        release.set()
        assert await asyncio.gather(*held) == [True, True, True]
        assert stuck.pending == 0
        stuck.close()
        other.close()

    asyncio.run(scenario())


def test_a_cancelled_caller_frees_its_place_once_the_call_ends() -> None:
    async def scenario() -> None:
        pool = Pool("p", threads=1, max_waiting=0)
        release = threading.Event()
        waiter = asyncio.ensure_future(pool.run(release.wait))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(Overloaded):  # the thread still runs the call
            await pool.run(time.sleep, 0)
        release.set()
        for _ in range(100):
            if pool.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert await pool.run(lambda: "free") == "free"
        pool.close()

    asyncio.run(scenario())


# -- uploads (unit) ---------------------------------------------------------------------------


async def _body(*chunks: bytes, stall: float = 0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
    if stall:
        await asyncio.sleep(stall)


def _uploads(tmp_path: Path, **settings: object) -> tuple[Registry, Uploads]:
    config = Settings(home=tmp_path / "home", **settings)  # type: ignore[arg-type]
    registry = Registry.open(config)
    return registry, Uploads(registry, config)


def _partials(registry: Registry) -> list[str]:
    return [p.name for p in registry.blobs.root.iterdir() if p.name.startswith(".partial-")]


def test_uploads_are_bounded_and_leave_nothing_when_dropped(tmp_path: Path) -> None:
    registry, uploads = _uploads(tmp_path, upload_idle_timeout=0.2, max_upload_size=2 * MiB,
                                 max_staged_uploads=3 * MiB)
    data = os.urandom(MiB + 5)
    digest = hashlib.sha256(data).hexdigest()

    async def scenario() -> None:
        assert await uploads.receive(digest, _body(data[:MiB], data[MiB:])) is True
        assert await uploads.receive(digest, _body(data)) is False  # already there
        with pytest.raises(UploadStalled):
            await uploads.receive("0" * 64, _body(b"x" * 1000, stall=5))
        with pytest.raises(UploadTooLarge):
            await uploads.receive("1" * 64, _body(b"y" * (2 * MiB + 1)))
        with pytest.raises(StagingFull):  # 1 MiB stored and unused + 2.5 MiB > 3 MiB
            await uploads.receive("2" * 64, _body(b"z" * MiB, b"z" * MiB))
        await asyncio.sleep(0.2)  # the discards run on the blob pool

    try:
        asyncio.run(scenario())
        assert registry.blobs.exists(digest) and not _partials(registry)
        assert uploads.active == 0 and uploads.receiving == 0
    finally:
        registry.close()


def test_the_sweep_removes_old_unused_blobs_and_never_a_models(tmp_path: Path, smollm2_path: Path) -> None:
    from myllm.pull import pull

    settings = Settings(home=tmp_path / "home")
    registry = Registry.open(settings)
    try:
        model = pull(registry, settings, str(smollm2_path)).model
        old, young = (registry.blobs.commit(registry.blobs.stage_stream(_bytes_io(b"old" * n))) for n in (1, 2))
        past = time.time() - 3600
        for digest in (old, model.digest):
            os.utime(registry.blobs.path(digest), (past, past))
        assert registry.sweep_unused_blobs(60) == [old]
        assert registry.blobs.exists(model.digest) and registry.blobs.exists(young)
    finally:
        registry.close()


def _bytes_io(data: bytes):  # type: ignore[no-untyped-def]
    import io

    return io.BytesIO(data)


# -- templates (unit) -------------------------------------------------------------------------

BOMBS = {
    "printf": "{{ '%0400000000d' % 0 }}",
    "printf star": "{{ '%*d' % (400000000, 1) }}",
    "printf precision": "{{ '%.400000000f' % 1.0 }}",
    "format": "{{ '{:>400000000}'.format(1) }}",
    "format nested": "{{ '{:{w}}'.format(1, w=400000000) }}",
    "format filter": "{{ '%0400000000d'|format(0) }}",
    "ljust": "{{ 'x'.ljust(400000000) }}",
    "rjust": "{{ 'x'.rjust(400000000) }}",
    "center": "{{ 'x'.center(400000000) }}",
    "center filter": "{{ 'x'|center(400000000) }}",
    "zfill": "{{ '1'.zfill(400000000) }}",
    "indent": "{{ ('x\n' * 1000)|indent(1000000) }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(1000000) }}",
    "replace": "{{ ('x' * 100000).replace('x', 'y' * 10000) }}",
    "replace filter": "{{ ('x' * 100000)|replace('x', 'y' * 10000) }}",
    "join": "{{ ('y' * 10000).join('x' * 100000) }}",
    "join filter": "{{ ('x' * 100000)|join('y' * 10000) }}",
    "translate": "{{ ('x' * 100000).translate({120: 'y' * 10000}) }}",
    "wordwrap": "{{ ('x ' * 100000)|wordwrap(1, true, 'y' * 10000) }}",
    "string times": "{{ 'x' * 400000000 }}",
    "times string": "{{ 400000000 * 'x' }}",
    "list times": "{{ ([1] * 100000000)|length }}",
    "tilde doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "kept alive": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l, 'x' * 1000000 ~ i] %}{% endfor %}",
    "set block": "{% set b %}{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endset %}{{ b|length }}",
    "macro": "{% macro m() %}{% for i in range(100000) %}x{% endfor %}{% endmacro %}"
             "{% set ns = namespace(s='') %}{% for i in range(10000) %}{% set ns.s = ns.s ~ m() %}{% endfor %}",
    "integer squaring": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "power tower": "{{ ((7 ** 64) ** 64) ** 64 > 0 }}",
    "to_bytes": "{{ (1).to_bytes(400000000, 'big')|length }}",
    "tojson indent": "{{ [1]|tojson(indent=100000000) }}",
    "batch": "{{ [1]|batch(100000000, 'x')|list|length }}",
    "slice": "{{ [1]|slice(100000000)|list|length }}",
    "printed list": "{% set l = ['x' * 10000000] * 10 %}{{ l }}",
    "string filter": "{% set l = ['x' * 10000000] * 10 %}{{ l|string|length }}",
    "sum of lists": "{% set l = [['x'] * 1000000] * 100 %}{{ l|sum(start=[])|length }}",
    "two messages": "{% if messages|length > 1 %}{{ 'x' * 400000000 }}{% endif %}",
    "a system message": "{% if messages[0].role == 'system' %}{{ 'x'.ljust(400000000) }}{% endif %}",
    "tools": "{% if tools %}{{ '%0400000000d' % 0 }}{% endif %}",
    "many messages": "{% if messages|length > 100 %}{{ 'x'|center(400000000) }}{% endif %}",
}
"""Each asked the daemon for 0.4 GB or more (or looped until it had it) before issue 27."""


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("template", BOMBS.values(), ids=BOMBS.keys())
def test_every_allocating_operation_is_refused_before_it_allocates(template: str) -> None:
    before = _peak_rss_mib()
    with pytest.raises(InvalidOptions) as info:
        check_template(template)
    assert info.value.field == "template" and "limit" in info.value.message
    assert _peak_rss_mib() - before < 200, "the template allocated before it was refused"


LLAMA31_LIKE = """{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: " + date_string + "\\n\\n" }}
{%- if tools is defined %}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}{%- endif %}
{{- system }}{{- "<|eot_id|>" }}
{%- for message in messages %}{%- if 'tool_calls' in message %}
{{- '{"name": "' + message.tool_calls[0].function.name + '", "parameters": ' }}{{- message.tool_calls[0].function.arguments | tojson }}{{- "}" }}
{%- else %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
QWEN3_LIKE = """{%- for message in messages %}{%- set content = message.content %}
{%- if message.role == "assistant" and '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


@pytest.mark.parametrize("template", [CHATML, GEMMA, LLAMA31_LIKE, QWEN3_LIKE], ids=["chatml", "gemma", "llama3.1", "qwen3"])
def test_real_templates_render_conversations_as_large_as_a_body(template: str) -> None:
    check_template(template)
    big = "word " * 400_000 + "</think> the answer"  # 2 MB, twice: as large as a 4 MB body allows
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": big},
                {"role": "assistant", "content": big}, {"role": "user", "content": "And?"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert "the answer" in render_chat(messages, template, "llama", "<s>", "</s>", deadline=Deadline(10), tools=tools).text
    many = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " * 20} for i in range(5001)]
    assert "message 5000" in render_chat(many, template, "llama", "<s>", "</s>", deadline=Deadline(10)).text


def test_a_rendering_counts_what_it_builds_in_all() -> None:
    """Each value under the bound, but kept alive one after another: the budget stops it."""
    template = "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = [ns.l, 'x' * 8000000 ~ i] %}{% endfor %}"
    with pytest.raises(InvalidOptions) as info:
        check_template(template)
    assert "in all" in info.value.message and str(template_limits.MAX_BUILT) in info.value.message


# -- case 3: stalled uploads against the daemon ------------------------------------------------


@pytest.fixture(scope="module")
def uploads_daemon(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    with hostile_daemon(models_home, tmp_path_factory.mktemp("pools") / "home", MYLLM_UPLOAD_IDLE_TIMEOUT="8",
                        MYLLM_MAX_UPLOADS="4", MYLLM_MAX_UPLOAD_SIZE="2MiB", MYLLM_MAX_STAGED_UPLOADS="3MiB",
                        MYLLM_BLOB_TTL="6") as hostile:
        yield hostile


def _stalled_upload(h: Hostile, n: int) -> socket.socket:
    """An upload that sends its headers and one chunk, then nothing."""
    port = int(h.ollama.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    digest = hashlib.sha256(f"never sent {n}".encode()).hexdigest()
    sock.sendall(f"POST /api/blobs/sha256:{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n"
                 "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
    return sock


def _status(sock: socket.socket) -> int:
    with sock:
        return int(sock.recv(4096).split()[1])


def test_stalled_uploads_take_no_thread_any_route_needs(uploads_daemon: Hostile) -> None:
    h = uploads_daemon
    stalled = min(32, (os.cpu_count() or 1) + 4) + 2  # more than the shared pool's threads were
    with still_answering(h, min_rounds=3):
        sockets = [_stalled_upload(h, n) for n in range(stalled)]
        until = time.monotonic() + 5
        while time.monotonic() < until:  # the routes that read the registry answer meanwhile
            assert httpx.get(f"{h.ollama}/api/tags", headers=key(BOB), timeout=5).status_code == 200
            assert httpx.get(f"{h.url}/api/models", headers=key(BOB), timeout=5).status_code == 200
            time.sleep(0.5)
        statuses = sorted(_status(sock) for sock in sockets)
    assert statuses == [408] * 4 + [429] * (stalled - 4)  # four slots, each dropped once idle
    assert not [p for p in (h.home / "blobs").iterdir() if p.name.startswith(".partial-")]


def test_uploads_are_bounded_in_size_and_swept_when_no_model_uses_them(uploads_daemon: Hostile,
                                                                        tmp_path: Path) -> None:
    h = uploads_daemon
    client = ollama.Client(host=h.ollama, headers=key(ADMIN), timeout=60)
    files = {}
    for name, size in (("a", 3 * MiB // 2), ("b", 3 * MiB // 2), ("c", MiB), ("huge", 5 * MiB // 2)):
        files[name] = tmp_path / name
        files[name].write_bytes(os.urandom(size))
    with still_answering(h):
        with pytest.raises(ollama.ResponseError) as large:
            client.create_blob(files["huge"])
        assert large.value.status_code == 413
        uploaded = [client.create_blob(files["a"]), client.create_blob(files["b"])]
        with pytest.raises(ollama.ResponseError) as full:  # 3 MiB no model uses are stored
            client.create_blob(files["c"])
        assert full.value.status_code == 507
        for _ in range(60):  # swept after MYLLM_BLOB_TTL (6 s), checked every 3 s
            if not any(client._client.head(f"/api/blobs/{d}").status_code == 200 for d in uploaded):
                break
            time.sleep(0.5)
        assert [client._client.head(f"/api/blobs/{d}").status_code for d in uploaded] == [404, 404]
        client.create_blob(files["c"])  # room again
    assert httpx.post(f"{h.ollama}/api/show", json={"model": MODEL}, headers=key(BOB), timeout=30).status_code == 200
    assert h.chat().status_code == 200  # the model's own blob was never swept
    assert not [p for p in (h.home / "blobs").iterdir() if p.name.startswith(".partial-")]


# -- case 4: template bombs against the daemon --------------------------------------------------


@pytest.fixture(scope="module")
def templates_daemon(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    with hostile_daemon(models_home, tmp_path_factory.mktemp("templates") / "home") as hostile:
        yield hostile


def _daemon_peak_rss(h: Hostile) -> int:
    """The daemon process's own peak resident memory (VmHWM): a spike between two samples counts."""
    status = Path(f"/proc/{h.daemon.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_template_bombs_are_refused_at_create_without_allocating(templates_daemon: Hostile) -> None:
    h = templates_daemon
    client = ollama.Client(host=h.ollama, headers=key(ADMIN), timeout=60)
    with still_answering(h):
        for name, template in BOMBS.items():
            with pytest.raises(ollama.ResponseError) as info:
                client.create(model="boom", from_=MODEL, template=template)
            assert info.value.status_code == 400 and "chat template" in str(info.value.error), name
    assert _daemon_peak_rss(h) < 768 * MiB, f"the daemon peaked at {_daemon_peak_rss(h) / MiB:.0f} MiB"
    models = [m["name"] for m in httpx.get(f"{h.ollama}/api/tags", headers=key(BOB), timeout=5).json()["models"]]
    assert "boom:latest" not in models


def test_a_template_that_explodes_past_the_checked_conversations_fails_the_chat_not_the_daemon(
        templates_daemon: Hostile) -> None:
    h = templates_daemon
    template = "{% if messages|length > 150 %}{{ 'x'|center(1500000000) }}{% endif %}" + CHATML
    client = ollama.Client(host=h.ollama, headers=key(ADMIN), timeout=60)
    client.create(model="late-boom", from_=MODEL, template=template)  # renders every checked conversation
    messages = [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(151)]
    with still_answering(h):
        r = httpx.post(f"{h.url}/api/chat", headers=key(BOB), timeout=60,
                       json={"model": "late-boom", "messages": messages, "stream": False})
        assert r.status_code == 400 and "chat template" in r.text, r.text
    assert _daemon_peak_rss(h) < 768 * MiB, f"the daemon peaked at {_daemon_peak_rss(h) / MiB:.0f} MiB"
