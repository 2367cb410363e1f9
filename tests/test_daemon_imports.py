"""The daemon process loads no engine code: generation runs in runner processes, and what the
daemon shares with them (runtime/engine_types.py, runtime/runner/protocol.py) is plain data. An
import of `myllm.runtime.engine` or of llama-cpp-python on the daemon's side would load code and
libraries it never runs (and, for llama.cpp's, take memory and a GPU context in the daemon)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DAEMON = """
import asyncio, json, sys

import httpx

from myllm.api.app import create_app
from myllm.api.server import serve  # noqa: F401  (what `myllm serve` imports)
from myllm.settings import Settings


async def main() -> None:
    app = create_app(Settings(num_threads=2, num_ctx=512))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            chat = await client.post("/v1/chat/completions", json={
                "model": "smollm2:135m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 200, chat.text
            assert chat.json()["usage"]["completion_tokens"] >= 1


asyncio.run(main())
engine = [m for m in sys.modules if m == "myllm.runtime.engine" or m.startswith("myllm.runtime.engine.")]
print(json.dumps({"engine": sorted(engine), "llama_cpp": sorted(m for m in sys.modules if m.split(".")[0] == "llama_cpp"),
                  "runtime": sorted(m for m in sys.modules if m.startswith("myllm.runtime."))}))
"""


def test_the_daemon_imports_no_engine_module_nor_llama_cpp(private_home: Path) -> None:
    """The app built and started, and a chat answered through a runner, in a fresh interpreter:
    no module of runtime/engine/ and no llama_cpp is loaded (the runtime's own modules are)."""
    done = subprocess.run([sys.executable, "-c", DAEMON], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["engine"] == [] and loaded["llama_cpp"] == []
    assert {"myllm.runtime.service", "myllm.runtime.placement.manager", "myllm.runtime.runner.client",
            "myllm.runtime.runner.protocol", "myllm.runtime.engine_types"} <= set(loaded["runtime"])
