"""A small inventory kept in a JSON file, with a tiny HTTP status server."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


class Inventory:
    """Item counts persisted to one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        return dict(json.loads(self.path.read_text()))

    def add(self, name: str, count: int = 1) -> int:
        items = self.load()
        items[name] = items.get(name, 0) + count
        self.path.write_text(json.dumps(items, sort_keys=True))
        return items[name]


def status_server(inventory: Inventory, port: int = 0) -> HTTPServer:
    """An HTTP server on 127.0.0.1 that answers with the inventory as JSON."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            body = json.dumps(inventory.load()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return None

    return HTTPServer(("127.0.0.1", port), Handler)
