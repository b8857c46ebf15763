"""A local stand-in for the Hugging Face Hub's model-repo API, serving files from a folder (as moto serves S3).

huggingface_hub's own HfFileSystem talks to it over HTTP (`storage_options={"endpoint": url}`): repo info, tree
listings, paths-info and byte-range reads of `/{repo}/resolve/{revision}/{path}`. Repos are the folders two levels
under the root (`owner/name`). Only what reading a public model repo needs is served.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

SHA = "0" * 40


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _repo(self, parts: list[str]) -> Path | None:
        repo = self.root / parts[0] / parts[1] if len(parts) >= 2 else None
        return repo if repo is not None and repo.is_dir() else None

    def _entry(self, repo: Path, path: Path) -> dict:
        rel = path.relative_to(repo).as_posix()
        if path.is_dir():
            return {"type": "directory", "path": rel, "oid": SHA}
        return {"type": "file", "path": rel, "size": path.stat().st_size,
                "oid": hashlib.sha1(path.read_bytes()).hexdigest()}

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        url = urllib.parse.urlparse(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            repo = self._repo(parts[2:4])
            if repo is None:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
                return self._json({"id": "/".join(parts[2:4]), "sha": SHA, "private": False,
                                   "siblings": [{"rfilename": f} for f in files]})
            if rest[0] == "tree":
                folder = repo.joinpath(*rest[2:])
                if not folder.is_dir():
                    return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
                recursive = "recursive=true" in url.query.lower()
                found = folder.rglob("*") if recursive else folder.iterdir()
                return self._json([self._entry(repo, p) for p in sorted(found)])
            return self._send(404)
        repo = self._repo(parts[:2])
        if repo is None or parts[2:3] != ["resolve"]:
            return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
        path = repo.joinpath(*parts[4:])
        if not path.is_file():
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start_s, _, end_s = wanted[6:].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = min(int(end_s), len(data) - 1) if start_s and end_s else len(data) - 1
            return self._send(206, data[start:end + 1],
                              {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return self._send(200, data, headers)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlparse(self.path).path.strip("/").split("/")]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        repo = self._repo(parts[2:4]) if parts[:2] == ["api", "models"] else None
        if repo is None or parts[4:5] != ["paths-info"]:
            return self._send(404)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = urllib.parse.parse_qs(body).get("paths", [])
        found = [repo / p for p in paths]
        return self._json([self._entry(repo, p) for p in found if p.exists()])


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """(the running server, its endpoint URL) for the repos under `root`; call .shutdown() when done."""
    handler = type("Handler", (_Handler,), {"root": Path(root)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
