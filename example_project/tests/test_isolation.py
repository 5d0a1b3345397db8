"""Tests that rely on the sandbox: each passes, and the repo stays as it was."""

import json
import os
import socket
import threading
import urllib.request
from pathlib import Path

from inventory import Inventory, status_server

DATA = Path(__file__).resolve().parents[1] / "data.json"


def test_adding_stock_writes_the_shared_data_file():
    # Writes into the repo's data file: inside the sandbox the write is real,
    # afterwards it is thrown away with the overlay.
    assert Inventory(DATA).add("apples", 10) == 13
    assert json.loads(DATA.read_text())["apples"] == 13


def test_the_data_file_is_untouched_by_the_previous_test():
    assert json.loads(DATA.read_text()) == {"apples": 3, "pears": 5}


def test_deleting_the_data_file_is_harmless():
    DATA.unlink()
    assert not DATA.exists()


def test_status_server_on_loopback():
    server = status_server(Inventory(DATA))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/") as response:
            assert json.load(response) == {"apples": 3, "pears": 5}
    finally:
        server.shutdown()


def test_only_loopback_is_there():
    assert socket.if_nameindex() == [(1, "lo")]


def test_own_pid_namespace():
    # The sandbox's init is pid 1 and this test pid 2: no host process is visible.
    assert os.getpid() == 2
    assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]


def test_private_tmp(tmp_path):
    Path("/tmp/inventory-scratch.txt").write_text("only in this sandbox")
    (tmp_path / "report.txt").write_text("tmp_path still works")
    assert Path("/tmp/inventory-scratch.txt").exists()
