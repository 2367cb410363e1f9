"""Database engine set-up: any SQLAlchemy URL. SQLite gets WAL and a busy timeout; a server
database (PostgreSQL, shared by several daemons) gets a pool sized for the threads that call it
(`myllm/pools.py`), connections checked before use, and a lost server reported as `StoreUnavailable` (503)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, ExceptionContext, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from myllm.errors import StoreUnavailable
from myllm.registry.migrations import migrate

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger(__name__)

SPARE_CONNECTIONS = 2
"""Connections beyond the pools' threads (`Pools.connections`, every thread that runs database
calls): for start-up checks and the CLI's own calls. Bursts from other threads overflow by as
many again as the pool keeps."""
RETRIES, FIRST_RETRY = 5, 0.2
"""How often `retried` tries a write, and its first pause (doubling after each try)."""
CONNECT_TIMEOUT = 5
"""Seconds a new connection may take: past it the call is `StoreUnavailable`, not a hang."""


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _unavailable(context: ExceptionContext) -> None:
    """A database that cannot be reached, or dropped the connection, is `StoreUnavailable`
    (the connection is discarded by the pool; the next call opens a new one). Other errors
    (a constraint, a bug) keep their own type, and so does an interruption (a BaseException
    such as KeyboardInterrupt, which SQLAlchemy also counts as a disconnect)."""
    lost = context.is_disconnect or isinstance(context.sqlalchemy_exception, OperationalError)
    if lost and isinstance(context.original_exception, Exception):
        raise StoreUnavailable(f"the database is unavailable ({type(context.original_exception).__name__}); "
                               "try again shortly") from context.original_exception


def make_engine(url: str, threads: int = 8) -> Engine:
    """The engine for `url`; a server database keeps a connection for each of `threads` (the
    threads that may call it at once) and `SPARE_CONNECTIONS`."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        connect_args = {"connect_timeout": CONNECT_TIMEOUT} if parsed.get_backend_name() == "postgresql" else {}
        size = threads + SPARE_CONNECTIONS
        engine = create_engine(url, pool_pre_ping=True, pool_size=size, max_overflow=size, pool_timeout=10,
                               connect_args=connect_args)
    event.listen(engine, "handle_error", _unavailable)
    migrate(engine)
    return engine


def retried(write: Callable[P, T]) -> Callable[P, T]:
    """`write`, tried again (0.2, 0.4, 0.8, 1.6 s apart) while the database is unavailable: for
    the writes that store a generated turn, so a database restart delays the turn rather than
    losing it. Still unavailable after that: `StoreUnavailable`."""

    @functools.wraps(write)
    def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(RETRIES - 1):
            try:
                return write(*args, **kwargs)
            except (StoreUnavailable, PoolTimeout) as exc:
                log.warning("storing a turn: %s; trying again in %.1f s", exc, FIRST_RETRY * 2**attempt)
                time.sleep(FIRST_RETRY * 2**attempt)
        try:
            return write(*args, **kwargs)
        except PoolTimeout:
            raise StoreUnavailable("every database connection is busy; try again shortly") from None

    return retrying
