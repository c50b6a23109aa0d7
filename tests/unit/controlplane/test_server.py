"""The API server's stop (controlplane/server.py): at once, not at uvicorn's next tick."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI

from controlplane import server as server_module
from controlplane.server import ApiServer


def test_a_stop_ends_serve_without_waiting_for_a_tick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ticks an hour apart, only the wake-up can end the loop; a client connection that
    stays open (an SDK's keep-alive) is closed at the stop, not waited for."""
    monkeypatch.setattr(server_module, "TICK_S", 3600.0)
    path = str(tmp_path / "api.sock")
    api = ApiServer(FastAPI(), path)
    thread = threading.Thread(target=api.serve)
    thread.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        client.settimeout(30)
        client.sendall(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 404 "), answer  # served: the loop runs
        api.stop()
        thread.join(30)
        assert not thread.is_alive(), "serve() did not return after stop()"
        while chunk := client.recv(4096):  # the rest of the answer, then EOF: the
            answer += chunk  # kept-alive connection was closed at the stop
    finally:
        client.close()
        if thread.is_alive():
            api.server.should_exit = api.server.force_exit = True
            thread.join(30)
    assert not Path(path).exists()
