"""Layers on other machines: a model spread over llama.cpp RPC workers (`myllm rpc-worker`, here
on loopback) answers as it does on the CPU alone; a worker that cannot be reached, or that goes
away while the model is loaded, is an error that names it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest

from myllm.errors import InvalidOptions, ModelLoadError
from myllm.modelfile import ModelfileError, parse
from myllm.registry.store import Registry
from myllm.runtime.devices import Devices
from myllm.runtime.engine.rpc import PROTO_MAJOR, greet, layers_that_fit
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.placement import rpc_workers
from myllm.runtime.placement.manager import ModelManager
from myllm.runtime.placement.memory import MiB, footprint
from myllm.runtime.request.options import GenerationOptions, sampling_defaults
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings, rpc_endpoints
from tests.server import free_port, running_server
from tests.test_gpu import FakeRunner, fake_gpu, fake_models, use  # noqa: F401  (fake_models: a fixture)

PROMPT = [{"role": "user", "content": "Name three colours and say why the sky is blue."}]


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def start_worker(port: int) -> Worker:
    """`myllm rpc-worker` on loopback, once its port accepts connections."""
    proc = subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", "rpc-worker", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker exited: {proc.stderr.read().decode() if proc.stderr else ''}"
        try:
            greet(f"127.0.0.1:{port}", timeout=2)
            return Worker(proc, port)
        except ModelLoadError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the RPC worker did not start listening")


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = start_worker(free_port())
    yield w
    w.stop()


def chat(url: str, max_tokens: int = 40) -> httpx.Response:
    return httpx.post(f"{url}/api/chat", json={"model": "smollm2:135m", "stream": False, "messages": PROMPT,
                                               "options": {"temperature": 0, "max_tokens": max_tokens}}, timeout=120)


def test_greedy_output_is_the_same_with_every_layer_on_a_worker(api_settings: Settings, worker: Worker) -> None:
    with running_server(api_settings) as url:
        alone = chat(url)
    assert alone.status_code == 200, alone.text
    before = psutil.Process(worker.proc.pid).memory_info().rss
    with running_server(api_settings.model_copy(update={"rpc_servers": worker.endpoint})) as url:
        spread = chat(url)
        held = psutil.Process(worker.proc.pid).memory_info().rss - before
    assert spread.status_code == 200, spread.text
    assert spread.json()["message"]["content"] == alone.json()["message"]["content"]
    assert spread.json()["usage"]["completion_tokens"] == 40
    # SmolLM2's Q8 weights are ~140 MiB: the layers (and their KV cache) live in the worker.
    assert held > 100 << 20, f"the worker holds only {held >> 20} MiB"


def test_an_unreachable_worker_is_a_clear_error_in_each_api(api_settings: Settings) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    with running_server(api_settings.model_copy(update={"rpc_servers": nobody})) as url:
        native = chat(url)
        openai = httpx.post(f"{url}/v1/chat/completions", json={"model": "smollm2:135m", "messages": PROMPT},
                            timeout=60)
    assert native.status_code == 500, native.text
    assert f"RPC worker {nobody} cannot be reached (Connection refused)" in native.json()["detail"]
    assert openai.status_code == 500
    assert openai.json()["error"]["code"] == "model_load_failed"
    assert f"RPC worker {nobody} cannot be reached" in openai.json()["error"]["message"]


def test_a_worker_gone_between_requests_fails_its_requests_then_the_model_reloads_without_it(
    api_settings: Settings, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc_workers, "RECHECK", 0.0)  # the lost worker's port is tried at every request
    with running_server(api_settings.model_copy(update={"rpc_servers": worker.endpoint})) as url:
        first = chat(url, max_tokens=5)
        assert first.status_code == 200, first.text
        worker.stop()

        crashed = httpx.post(f"{url}/v1/chat/completions", json={  # llama.cpp's RPC client aborts the runner
            "model": "smollm2:135m", "messages": PROMPT, "max_tokens": 5}, timeout=60)
        assert crashed.status_code == 500, crashed.text
        error = crashed.json()["error"]
        assert error["code"] == "model_crashed"
        assert error["message"].startswith("the runner of model 'smollm2:135m' stopped (killed by SIGABRT: ")
        assert "Remote RPC server crashed" in error["message"]  # what llama.cpp said last
        assert error["message"].endswith(
            f"; its layers were on RPC workers {worker.endpoint}: one that stops answering ends the model, which "
            "loads again without it")
        assert "smollm2:135m" not in [m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"]]

        without = chat(url, max_tokens=5)  # loaded again on this machine alone: the same greedy text
        assert without.status_code == 200, without.text
        assert without.json()["message"]["content"] == first.json()["message"]["content"]

        back = start_worker(worker.port)  # the same worker, started again: the model loads on it again
        try:
            before = psutil.Process(back.proc.pid).memory_info().rss
            again = chat(url, max_tokens=5)
            assert again.status_code == 200, again.text
            assert again.json()["message"]["content"] == first.json()["message"]["content"]
            assert psutil.Process(back.proc.pid).memory_info().rss - before > 100 << 20  # the layers are on it
        finally:
            back.stop()


def test_a_worker_busy_with_another_client_is_named_not_waited_for() -> None:
    """A worker serves one client at a time: the kernel accepts a second connection, nobody
    answers it. A stand-in socket that accepts and stays silent (no llama.cpp needed)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ModelLoadError, match=f"RPC worker {endpoint} accepted but did not answer within 0.5 s"):
            greet(endpoint, timeout=0.5)


def test_a_worker_of_another_protocol_is_refused_before_llama_cpp_aborts() -> None:
    """A stand-in that answers the hello as a worker of the next major protocol would."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(64)
                conn.sendall((28).to_bytes(8, "little") + bytes([PROTO_MAJOR + 1, 0, 0, 0]) + bytes(24))

        thread = threading.Thread(target=answer)
        thread.start()
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ModelLoadError, match=f"speaks protocol {PROTO_MAJOR + 1}.0.0"):
            greet(endpoint)
        thread.join()


def test_worker_lists_are_checked_as_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rpc_endpoints(" 10.0.0.2:50052, gpu-box:50053 ") == ("10.0.0.2:50052", "gpu-box:50053")
    monkeypatch.setenv("MYLLM_RPC_SERVERS", "10.0.0.2")
    with pytest.raises(ValueError, match="RPC worker '10.0.0.2' is not host:port"):
        Settings()
    monkeypatch.setenv("MYLLM_RPC_SERVERS", "a:1,a:1")
    with pytest.raises(ValueError, match="name one twice"):
        Settings()


def test_layers_go_to_workers_while_their_share_of_free_memory_holds_them() -> None:
    """Pure arithmetic on the planner's bytes per layer count (no llama.cpp)."""
    need = [0, 100, 150, 200, 250]
    assert layers_that_fit(need, free=1000) == 4
    assert layers_that_fit(need, free=200) == 2  # 90% of 200: 180
    assert layers_that_fit(need, free=50) == 0


# -- the daemon's side, with the fake runner and fake rows of test_gpu.py ----------------------------


class RecordingRunner(FakeRunner):
    """test_gpu's fake runner (loads instantly, named as fake), keeping the specs it was given."""

    specs: list[LoadSpec] = []

    @classmethod
    async def start(cls, config: RunnerConfig, max_queue: int) -> RecordingRunner:
        cls.specs.append(config.spec)
        return await super().start(config, max_queue)  # type: ignore[return-value]


async def test_workers_take_the_layers_a_local_gpu_would_with_the_planners_bytes(
    fake_models: Registry,  # noqa: F811  (the fixture imported above)
) -> None:
    RecordingRunner.specs = []
    settings = Settings(num_ctx=1024, kv_cache="0", num_parallel=1, rpc_servers="10.0.0.2:50052")

    async def one_gpu() -> Devices:
        return fake_gpu(free_mib=10_000)

    mgr = ModelManager(fake_models, settings, runner_factory=RecordingRunner.start,  # type: ignore[arg-type]
                       budget=20_000 * MiB, devices=one_gpu)
    row = fake_models.get("m:1")
    assert mgr.spec_for(row).rpc_servers == ("10.0.0.2:50052",) and mgr.spec_for(row).n_gpu_layers == -1
    await use(mgr, "m:1")
    await use(mgr, "m:1", num_gpu=4)
    every, four = RecordingRunner.specs
    assert every.n_gpu_layers == 0 and four.n_gpu_layers == 0, "the workers take the layers, not the local GPU"
    fp = footprint(row, 1024)
    assert len(every.rpc_layer_bytes) == fp.max_gpu_layers + 1 == 12 and len(four.rpc_layer_bytes) == 5
    assert every.rpc_layer_bytes[0] == 0 and list(every.rpc_layer_bytes) == sorted(every.rpc_layer_bytes)
    # A layer more is its weights (100 MiB in these rows) and its KV cache; no CUDA context counted.
    assert 100 * MiB < every.rpc_layer_bytes[3] - every.rpc_layer_bytes[2] < 150 * MiB
    assert every.rpc_layer_bytes[1] < fp.split(1).vram - 400 * MiB

    row.parameters = {"rpc_servers": "10.0.0.3:50052, 10.0.0.4:50052"}  # the model's own (a Modelfile PARAMETER)
    assert mgr.spec_for(row).rpc_servers == ("10.0.0.3:50052", "10.0.0.4:50052")
    assert mgr.spec_for(row, embedding=True).rpc_servers == (), "embeddings stay on this machine"
    await mgr.close()


def test_only_a_model_names_its_workers_never_a_request() -> None:
    assert parse('FROM x\nPARAMETER rpc_servers "10.0.0.2:50052,10.0.0.3:50052"\n').parameters == {
        "rpc_servers": "10.0.0.2:50052,10.0.0.3:50052"}
    with pytest.raises(ModelfileError, match="invalid option 'rpc_servers': RPC worker 'nowhere' is not host:port"):
        parse("FROM x\nPARAMETER rpc_servers nowhere\n")
    with pytest.raises(InvalidOptions, match="invalid option 'rpc_servers'"):
        GenerationOptions.parse({"rpc_servers": "10.0.0.2:50052"})
    assert sampling_defaults({"rpc_servers": "10.0.0.2:50052", "top_k": 5}).top_k == 5
