"""Structured logs: one JSON object per line, carrying the request id of the RPC being served.

The gateway's interceptor puts each call's request id (from `x-request-id` or generated) in
a context variable, so every log line written while serving that call carries it, whichever
module writes it. The access log adds method, status and ms as fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "clipsearch_request_id", default=None
)

_SCALARS = frozenset({int, float, bool, type(None)})  # written as they are; anything else str()
_ENCODER = json.JSONEncoder(
    ensure_ascii=False
)  # json.dumps(..., ensure_ascii=False) makes one a call

_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id", ...extra fields}`.

    The access log writes a line per RPC through it, so it keeps per-line work small: the
    timestamp's date and time are formatted once per second, the encoder is made once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads never see half of it

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached, stamp = self._second
        if second != cached:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, stamp)
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                plain = type(value) in _SCALARS or isinstance(value, int | float | bool | None)
                out[key] = value if plain else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(out)


def setup(json_logs: bool, level: int = logging.INFO) -> None:
    """Configure the root logger for the server process (plain text or JSON)."""
    handler = logging.StreamHandler()
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
