"""The page's HTTP server (standard library only): the page, a JSON search endpoint, and the
thumbnails written at ingest. Every search goes to the gateway through `clipsearch.Client`.

Routes:
  GET  /                       the page
  GET  /api/search?q=&k=&decay=    text query, JSON hits
  POST /api/search?k=&decay=       body = an encoded image, JSON hits
  GET  /thumb?id=                  the document's thumbnail (JPEG) or a placeholder (SVG)
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import grpc

from clipsearch.client import Client, SearchResult
from clipsearch.thumbnails import ThumbnailStore

log = logging.getLogger("clipsearch.ui")
PAGE = Path(__file__).with_name("index.html")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_K = 100
_PLACEHOLDER = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160">'
    b'<rect width="100%" height="100%" fill="#ddd"/><text x="50%" y="50%" font-size="14" '
    b'text-anchor="middle" fill="#777">no thumbnail</text></svg>'
)


def hits_json(result: SearchResult) -> dict[str, Any]:
    return {
        "hits": [
            {
                "id": h.id,
                "score": h.score,
                "similarity": h.similarity,
                "decay": h.decay,
                "publish_time": h.publish_time.isoformat(timespec="seconds"),
                "caption": h.caption,
                "metadata": h.metadata,
                "thumbnail": f"/thumb?id={quote(h.id, safe='')}",
            }
            for h in result.hits
        ],
        "total_ms": round(result.timings_ms["total"], 1),
    }


class UiHandler(BaseHTTPRequestHandler):
    client: Client
    thumbnails: ThumbnailStore | None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.read_bytes())
        elif url.path == "/api/search":
            self._search(params, text=params.get("q", ""))
        elif url.path == "/thumb":
            self._thumb(params.get("id", ""))
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found")

    def do_POST(self) -> None:
        url = urlparse(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        if url.path != "/api/search":
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found")
        elif not 0 < length <= MAX_UPLOAD_BYTES:
            self._error(HTTPStatus.BAD_REQUEST, f"upload 1 byte to {MAX_UPLOAD_BYTES} bytes")
        else:
            self._search(params, image=self.rfile.read(length))

    def _search(self, params: dict[str, str], text: str = "", image: bytes | None = None) -> None:
        try:
            k = min(MAX_K, max(1, int(params.get("k", "12"))))
            decay = max(0.0, float(params.get("decay", "0")))
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "k must be an integer and decay a number")
            return
        if image is None and not text.strip():
            self._error(HTTPStatus.BAD_REQUEST, "type a query or choose an image")
            return
        try:
            result = self.client.search(
                text if image is None else None, image=image, top_k=k, decay_per_day=decay
            )
        except grpc.RpcError as exc:
            status = HTTPStatus.BAD_REQUEST
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                status = HTTPStatus.BAD_GATEWAY
            self._error(status, f"{exc.code().name}: {exc.details()}")
            return
        self._send(HTTPStatus.OK, "application/json", json.dumps(hits_json(result)).encode())

    def _thumb(self, doc_id: str) -> None:
        data = self.thumbnails.get(doc_id) if self.thumbnails and doc_id else None
        if data is None:
            self._send(HTTPStatus.OK, "image/svg+xml", _PLACEHOLDER)
        else:
            self._send(HTTPStatus.OK, "image/jpeg", data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, "application/json", json.dumps({"error": message}).encode())

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def make_server(
    gateway: str, host: str = "127.0.0.1", port: int = 8080, thumbnails: Path | None = None
) -> ThreadingHTTPServer:
    """An HTTP server (not started) whose handler talks to `gateway`; port 0 = any free."""
    handler = type(
        "BoundUiHandler",
        (UiHandler,),
        {
            "client": Client(gateway, timeout=30.0),
            "thumbnails": ThumbnailStore(thumbnails) if thumbnails else None,
        },
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def start_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="clipsearch-ui")
    thread.start()
    return thread


def add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--server", default="127.0.0.1:50051", help="the gateway (gRPC)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--thumbnails", type=Path, help="thumbnail folder written by ingest")


def run_command(args) -> None:  # type: ignore[no-untyped-def]
    server = make_server(args.server, args.host, args.port, args.thumbnails)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    print(f"clipsearch ui on http://{host}:{port}/ (gateway {args.server}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
