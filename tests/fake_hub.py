"""A Hugging Face hub on 127.0.0.1 that serves one model folder, enough for `from_pretrained` to download it."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, folder: Path, repo_id: str):
        self.folder, self.repo_id = folder, repo_id
        self.requests: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, send_body=True) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _serve(self, send_body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                api = f"/api/models/{hub.repo_id}"
                if path in (api, f"{api}/revision/main"):
                    siblings = [{"rfilename": file.name} for file in hub.folder.iterdir()]
                    info = {"id": hub.repo_id, "sha": COMMIT, "private": False, "siblings": siblings}
                    return self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)
                if path.startswith(f"{api}/tree/"):
                    return self._reply(200, b"[]", {"Content-Type": "application/json"}, send_body)
                prefix = f"/{hub.repo_id}/resolve/"
                if path.startswith(prefix):
                    file = hub.folder / path[len(prefix):].partition("/")[2]
                    if file.is_file():
                        data = file.read_bytes()
                        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                        return self._reply(200, data, headers, send_body)
                    return self._reply(404, headers={"X-Error-Code": "EntryNotFound"}, send_body=send_body)
                self._reply(404, headers={"X-Error-Code": "RepoNotFound"}, send_body=send_body)

            def do_HEAD(self) -> None:
                self._serve(send_body=False)

            def do_GET(self) -> None:
                self._serve(send_body=True)

        return Handler
