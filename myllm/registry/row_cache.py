"""Model rows kept between requests, for as long as SQLite says nothing was committed since.

Every generation starts by looking its model's row up. On the database pool that is a thread
hop and a query, about a third of a millisecond on a quiet machine and over one under
load: a tenth of a small model's first token. A cached row must never outlive a change,
and the registry is written by more than this daemon (`myllm pull`/`rm` from the CLI open the
same file), so a cache on a timer would serve stale rows. SQLite's `PRAGMA data_version` is
exact for this: read on a connection that never writes, it changes whenever any other
connection, in this process or another, commits to the file. Checking it costs a couple of
microseconds and no I/O in WAL mode, so it runs on the event loop.

A server database (PostgreSQL, shared by several daemons) has no such counter: every lookup
goes to the database, as before.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy.engine import Engine

from myllm.registry.schema import ModelRow


class RowCache:
    """Rows by normalized name, all dropped when the database's version moves."""

    def __init__(self, engine: Engine) -> None:
        url = engine.url
        self._conn: sqlite3.Connection | None = None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            # never writes; timeout 0: a check that cannot read at once is a miss, never a wait
            self._conn = sqlite3.connect(url.database, timeout=0, check_same_thread=False, isolation_level=None)
        self._version: int | None = None
        self._rows: dict[str, ModelRow] = {}

    def version(self) -> int | None:
        """The database's commit counter as this connection sees it; None: no cache."""
        if self._conn is None:
            return None
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    def get(self, key: str) -> tuple[ModelRow | None, int | None]:
        """The cached row of `key` if nothing was committed since it was read, and the version
        to `put` a freshly read row under (read before the query, so a commit racing the query
        only costs a miss next time)."""
        version = self.version()
        if version is None or version != self._version:
            self._rows.clear()
            self._version = version
            return None, version
        return self._rows.get(key), version

    def put(self, key: str, row: ModelRow, version: int | None) -> None:
        if version is not None and version == self._version:
            self._rows[key] = row

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
