"""The two servers under comparison as processes: myllm's daemon (with its runners) and
llama.cpp's llama-server on the same GGUF, threads and context per sequence, each started,
waited for, sampled for peak RSS over its process tree, and stopped. compare.py starts one pair
for SmolLM2 and fast_engine.py another for its tiny model, alike."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from myllm.runtime.engine.llama_setup import cpu_has_amx

# A new connection per request for both servers: llama-server closes idle keep-alive
# connections on its own schedule, which races a client that reuses them.
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)

# {"myllm": (server, model name), "llama_server": (server, model name)}, myllm first.
Pair = dict[str, tuple["Server", str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process with an RSS sampler (over the process tree)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.peak_rss = 0
        self._lock = threading.Lock()
        self._sampling = True
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        """Peak RSS of the server and all its descendants together (myllm's runner processes
        hold the models; llama-server has none). The descendants are looked up once a second:
        psutil finds them by reading every process's entry in /proc, which, every 50 ms, held
        this process's GIL long enough to add milliseconds to the first tokens its clients time."""
        proc = psutil.Process(self.proc.pid)
        children: list[psutil.Process] = []
        for n in itertools.count():
            if not self._sampling:
                return
            try:
                if n % 20 == 0:
                    children = proc.children(recursive=True)
                total = proc.memory_info().rss
                for child in children:
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:  # exited meanwhile
                        pass
                with self._lock:
                    self.peak_rss = max(self.peak_rss, total)
            except psutil.Error:
                return
            time.sleep(0.05)

    def take_peak_mb(self) -> float:
        """The peak RSS since the start or the last call (MiB), and a fresh peak from now on:
        one figure per phase of the benchmark."""
        with self._lock:
            peak, self.peak_rss = self.peak_rss, 0
        return peak / 2**20

    def stop(self) -> None:
        self._sampling = False
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def llama_server_binary() -> str:
    """make bench's llama-server (bench/build_llama_server.sh: built once, then cached)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / "bench" / "build_llama_server.sh")], check=True, capture_output=True,
                         text=True, env={**os.environ, "PY": sys.executable}).stdout
    return str(root / out.strip().splitlines()[-1])  # the script answers relative to the repository


@contextmanager
def running_pair(llama_server: str, gguf: Path, name: str, threads: int, ctx: int, parallel: int) -> Iterator[Pair]:
    """myllm (in a throwaway home, `gguf` pulled as `name`) and llama-server, both with
    `parallel` sequences of `ctx` tokens each, up until the block ends."""
    home = Path(tempfile.mkdtemp(prefix="myllm-bench-"))
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(threads), "MYLLM_NUM_CTX": str(ctx),
           "MYLLM_NUM_PARALLEL": str(parallel), "MYLLM_MAX_QUEUE": "64",
           # loaded for the whole run, as llama-server's model is: an idle 5 minutes (one server's
           # turn on a slow machine) would otherwise unload it and drop what its runner keeps
           "MYLLM_KEEP_ALIVE": "-1"}
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    started: list[Server] = []
    try:
        subprocess.run([myllm_bin, "pull", str(gguf), "--name", name], env=env, check=True, capture_output=True)
        port = free_port()
        started.append(Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port))
        port = free_port()
        started.append(Server("llama-server", [
            llama_server, "-m", str(gguf), "-t", str(threads), "-c", str(ctx * parallel),
            "-np", str(parallel), "--port", str(port), "--host", "127.0.0.1",
            # myllm's runners keep weights in plain buffers on AMX CPUs (llama.cpp's AMX product
            # crashes there: engine/llama_setup.py); llama-server does the same with --no-repack.
            *(["--no-repack"] if cpu_has_amx() else [])], dict(os.environ), port))
        # llama-server serves its one model whatever name a request gives.
        yield {"myllm": (started[0], name), "llama_server": (started[1], name)}
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)
