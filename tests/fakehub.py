"""A local stand-in for the Hugging Face Hub, enough for `huggingface-hub` to list a repo and
download a file with HEAD + ranged GET. Tests point HF_ENDPOINT at it; nothing leaves loopback."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    path: Path
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]]) -> None:
        self.repos = {repo: {name: HubFile(p) for name, p in files.items()} for repo, files in repos.items()}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.cut_after: int | None = None
        """While set, a file GET stops sending at this byte offset and drops the connection."""
        self.chunk_delay = 0.0
        """Seconds to pause after each 256 KiB sent: a slow link, for interrupting pulls."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._server.shutdown()
        self._server.server_close()

    def ranges_requested(self) -> list[str]:
        return [h.get("Range", "") for m, _, h in self.requests if m == "GET" and "/resolve/" in _]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _route(self) -> None:
                hub.requests.append((self.command, self.path, dict(self.headers)))
                path = self.path.split("?", 1)[0]
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
                    return self._model_info(m.group(1))
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._file(m.group(1), m.group(3))
                self._json(404, {"error": "not found"})

            def _model_info(self, repo: str) -> None:
                files = hub.repos.get(repo)
                if files is None:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                siblings = [
                    {
                        "rfilename": name,
                        "size": f.path.stat().st_size,
                        "blobId": f.sha256[:40],
                        "lfs": {"sha256": f.sha256, "size": f.path.stat().st_size, "pointerSize": 134},
                    }
                    for name, f in files.items()
                ]
                self._json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})

            def _file(self, repo: str, filename: str) -> None:
                f = hub.repos.get(repo, {}).get(filename)
                if f is None:
                    code = "RepoNotFound" if repo not in hub.repos else "EntryNotFound"
                    return self._json(404, {"error": "not found"}, {"X-Error-Code": code})
                data = f.path.read_bytes()
                start = 0
                if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                    start = int(m.group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{f.sha256}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                end = len(data) if hub.cut_after is None else max(start, hub.cut_after)
                if hub.chunk_delay:
                    for offset in range(start, end, 256 * 1024):
                        self.wfile.write(data[offset : min(end, offset + 256 * 1024)])
                        time.sleep(hub.chunk_delay)
                else:
                    self.wfile.write(data[start:end])
                if end < len(data):
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

            do_GET = _route
            do_HEAD = _route

        return Handler
