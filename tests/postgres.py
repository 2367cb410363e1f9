"""A throwaway PostgreSQL cluster from Debian's `postgresql` package: initdb into a temp
folder, a server on a free loopback port (its socket in that folder too), trust auth for one
superuser, fsync off. As root (CI), the server runs as the package's `postgres` user, since
PostgreSQL refuses to run as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.server import free_port

USER = "myllm"


def _bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `make system-deps` installs Debian's postgresql package")
    return Path(found[-1]).parent


@dataclass
class Cluster:
    root: Path
    port: int
    bin: Path

    @property
    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self._as_owner, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl("-l", str(self.root / "server.log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="myllm-pg-"))
    cluster = Cluster(root, free_port(), _bin())
    try:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(root, owner.pw_uid, owner.pw_gid)
        subprocess.run([*cluster._as_owner, str(cluster.bin / "initdb"), "-D", str(root / "data"), "-U", USER,
                        "-A", "trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        cluster.start()
        yield cluster
    finally:
        try:
            cluster._ctl("-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # never started, or already stopped
        shutil.rmtree(root, ignore_errors=True)
