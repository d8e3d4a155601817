"""Benchmark data: the folder's precedence, downloads from a loopback server, and what offline users are told."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks import datasets


class DataServer:
    """Serves ../shared/data at the URL layout of the official repositories, on 127.0.0.1."""

    def __init__(self, root: Path, tamper: bool = False):
        self.root, self.tamper, self.requests = root, tamper, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                file = server.resolve(self.path)
                if file is None or not file.is_file():
                    self.send_response(404)
                    self.end_headers()
                    return
                data = file.read_bytes() + (b" " if server.tamper else b"")
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def resolve(self, path: str) -> Path | None:
        if path.startswith("/openai/"):
            return self.root / "gsm8k" / path.rpartition("/")[2]
        if path.startswith("/bbh-repo/bbh/"):
            return self.root / "bbh" / "tasks" / path.rpartition("/")[2]
        if path.startswith("/bbh-repo/cot-prompts/"):
            return self.root / "bbh" / "cot-prompts" / path.rpartition("/")[2]
        return None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server(shared_data, monkeypatch):
    serving = DataServer(shared_data)
    monkeypatch.setenv("D3_GSM8K_URL", f"{serving.base}/openai/grade_school_math/data")
    monkeypatch.setenv("D3_BBH_URL", f"{serving.base}/bbh-repo")
    yield serving
    serving.close()


def test_the_data_folder_option_then_environment_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("D3_DATA_DIR", raising=False)
    assert datasets.data_dir() == (tmp_path / "cache" / "data", True)
    monkeypatch.setenv("D3_DATA_DIR", str(tmp_path / "env"))
    assert datasets.data_dir() == (tmp_path / "env", False)
    assert datasets.data_dir(tmp_path / "option") == (tmp_path / "option", False)


def test_missing_files_are_downloaded_into_the_cache_and_checked(server, tmp_path, shared_data):
    folder = tmp_path / "data"
    wanted = ["gsm8k/test.jsonl", "bbh/tasks/navigate.json", "bbh/cot-prompts/navigate.txt"]
    fetched = []
    datasets.require(folder, wanted, downloadable=True, on_download=fetched.append)
    assert fetched == wanted
    for relative in wanted:
        assert (folder / relative).read_bytes() == (shared_data / relative).read_bytes()
    datasets.require(folder, wanted, downloadable=True, on_download=fetched.append)
    assert len(fetched) == 3  # nothing fetched twice
    assert "/bbh-repo/bbh/navigate.json" in server.requests


def test_a_file_that_is_not_the_official_one_is_refused(server, tmp_path):
    server.tamper = True
    with pytest.raises(UserError, match="not the official file"):
        datasets.require(tmp_path, ["gsm8k/test.jsonl"], downloadable=True)
    assert not (tmp_path / "gsm8k" / "test.jsonl").exists()


def test_offline_says_which_files_to_put_where(tmp_path, monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("D3_BBH_URL", f"http://127.0.0.1:{port}")
    files = [f"bbh/tasks/{name}.json" for name in ("a", "b", "c", "d")] + ["bbh/cot-prompts/a.txt"]
    with pytest.raises(UserError) as raised:
        datasets.require(tmp_path, files, downloadable=True)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "bbh/tasks/*.json (4 files)" in message and "bbh/cot-prompts/a.txt" in message


def test_a_folder_of_the_users_is_never_downloaded_into(tmp_path):
    with pytest.raises(UserError, match=r"missing in .*: gsm8k/test.jsonl"):
        datasets.require(tmp_path, ["gsm8k/test.jsonl"], downloadable=False)


def test_the_manifest_covers_every_official_file(shared_data):
    for relative, digest in datasets.SHA256.items():
        import hashlib

        assert hashlib.sha256((shared_data / relative).read_bytes()).hexdigest() == digest, relative
    assert len(datasets.SHA256) == 2 + 27 * 2
