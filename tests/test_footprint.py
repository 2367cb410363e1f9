"""What each process imports, which is most of its memory besides a model's.

A runner is a second interpreter beside the daemon, one per loaded model: everything it imports
it holds for as long as the model stays loaded. It needs the engines, llama.cpp, numpy, msgpack
and psutil; the daemon's side of the runtime (the request layer's pydantic options, the
registry's SQLAlchemy, asyncio and the API) once came along through shared modules and cost
each runner ~30 MB, and llama-cpp-python's high-level API ~9 MB more. The daemon imports Alembic (~10 MB) only when its database has a step pending.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNNER = """
import json, os, socket, sys, threading, traceback
from pathlib import Path

from myllm.runtime.engine_types import GenerationRequest, LoadSpec
from myllm.runtime.runner import child
from myllm.runtime.runner.protocol import RunnerConfig, RunnerOptions, encode_request, pack, unpacker

daemon, runner = socket.socketpair()


def messages():
    reader = unpacker()
    while chunk := daemon.recv(1 << 16):
        reader.feed(chunk)
        yield from reader


def drive() -> None:
    # The daemon's part: load, tokenize, one sampled generation with probabilities, stats.
    try:
        got = messages()
        spec = LoadSpec("smollm2:135m", Path(sys.argv[1]), 512, n_parallel=2)
        daemon.sendall(pack(["load", RunnerConfig(spec, 2, 1 << 20).encode()]))
        assert next(got)[0] == "ready"
        daemon.sendall(pack(["call", 1, "tokenize", ["The capital of France is"]]))
        tokens = next(got)[2]
        options = RunnerOptions(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1,
                                presence_penalty=0.0, frequency_penalty=0.0, seed=7, stop=("\\n\\n",),
                                max_tokens=4, logprobs=2, draft_max=None)
        daemon.sendall(pack(["gen", 1, encode_request(GenerationRequest(tokens, options))]))
        kinds = []
        while not {"d", "e"} & set(kinds):
            message = next(got)
            assert message[0] == "ev", message
            kinds += [event[0] for _, event in message[1]]
        assert kinds[-1] == "d", kinds
        daemon.sendall(pack(["call", 2, "stats", []]))
        assert next(got)[0] == "ok"
        print(json.dumps(sorted(sys.modules)), flush=True)
        daemon.sendall(pack(["exit"]))
    except BaseException:
        traceback.print_exc()
        os._exit(3)


threading.Thread(target=drive, daemon=True).start()
child.main(["runner", "smollm2:135m", str(runner.fileno())])
"""

DAEMON_SIDE = {"sqlalchemy", "alembic", "pydantic", "pydantic_core", "pydantic_settings", "fastapi", "starlette",
               "uvicorn", "asyncio", "httpx", "huggingface_hub", "jiter", "jinja2", "diskcache", "multiprocessing",
               "hashlib", "_hashlib"}
"""Packages a runner has no use for: the daemon's, those only llama-cpp-python's high-level
`Llama` imports (engine/llama_setup.py `bindings_only`), and hashlib, whose OpenSSL is 3.6 MiB of
memory (a vision model's runner imports it for its images' placeholders)."""

DAEMON_MODULES = ("myllm.registry", "myllm.runtime.request", "myllm.runtime.placement", "myllm.runtime.service",
                  "myllm.runtime.runner.client", "myllm.runtime.instance", "myllm.api", "myllm.pull", "myllm.settings")


def test_a_runner_imports_nothing_of_the_daemons_side(smollm2_path: Path) -> None:
    """The runner's own `main`, in a fresh interpreter, loads SmolLM2 and answers a tokenize, a
    sampled generation with probabilities and a stats call over its channel: by then it has
    imported none of the daemon's packages nor modules."""
    done = subprocess.run([sys.executable, "-c", RUNNER, str(smollm2_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "myllm.runtime.engine.batching" in loaded and "llama_cpp" in loaded  # it did run the engine
    assert not {m for m in loaded if m.split(".")[0] in DAEMON_SIDE}
    assert not {m for m in loaded if m.startswith(DAEMON_MODULES)}
    assert "llama_cpp.llama" not in loaded


REGISTRY = """
import json, sys

from myllm.registry.store import Registry
from myllm.settings import Settings

Registry.open(Settings(home=sys.argv[1]))
print(json.dumps("alembic" in sys.modules))
"""


def test_alembic_is_imported_only_to_migrate(tmp_path: Path) -> None:
    """A new home's database is migrated (Alembic loaded); opened again, already current, the
    registry does not import Alembic at all."""
    def alembic_loaded() -> bool:
        done = subprocess.run([sys.executable, "-c", REGISTRY, str(tmp_path)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return bool(json.loads(done.stdout.strip().splitlines()[-1]))

    assert alembic_loaded()
    assert not alembic_loaded()


DAEMON_DATABASE = """
import json, sys

import myllm.api.app, myllm.api.server  # noqa: E401, F401  (what `myllm serve` imports)
from myllm.registry.sessions import SessionStore
from myllm.registry.store import Registry
from myllm.settings import Settings

registry = Registry.open(Settings(home=sys.argv[1]))
SessionStore(registry.engine).append_turn("s", "chat", "m", [("user", "Hi", 1), ("assistant", "Hello", 1)])
assert [m.content for m in SessionStore(registry.engine).history("s")] == ["Hi", "Hello"]
registry.list()
registry.close()
print(json.dumps("sqlalchemy.orm" in sys.modules))
"""


def test_the_daemon_does_without_sqlalchemys_orm(tmp_path: Path) -> None:
    """The daemon's modules, and its registry opened, written and read, in a fresh interpreter:
    `sqlalchemy.orm` is never imported. The registry is written on SQLAlchemy's core because the
    ORM and its configured mappers cost the daemon ~9 MB of memory."""
    done = subprocess.run([sys.executable, "-c", DAEMON_DATABASE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False
