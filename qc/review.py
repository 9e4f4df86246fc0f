"""Local review of the curation: ratings file, ratings import and a 127.0.0.1 server.

Ratings live in ``OUTPUT_DIR/curation/ratings.json``::

    {"version": 1, "ratings": {"<path>": {"decision": "include"|"exclude"|"",
                                          "comment": "...", "reviewer": "...", "time": "..."}}}

keyed by the curation table's ``path`` column. Every change rewrites the
curation table so its ``override``/``include`` columns always honour the
ratings. Nothing leaves the machine: the server binds to 127.0.0.1 only,
checks the ``Host`` header (DNS rebinding) and needs a custom request header
on writes, which a cross-site page cannot send without a CORS preflight the
server never grants.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import mimetypes
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import InputError
from pipeline.core.layout import OutputLayout

__all__ = [
    "REVIEW_HEADER",
    "import_ratings",
    "load_ratings",
    "make_server",
    "ratings_path",
    "refresh_table",
    "save_ratings",
    "set_rating",
]

log = logging.getLogger(__name__)

REVIEW_HEADER = "X-Neurocurate-Review"
_DECISIONS = ("include", "exclude", "")
_MAX_COMMENT = 2000


def ratings_path(output_dir: str | Path) -> Path:
    return OutputLayout(Path(output_dir)).ratings


def _validate(entry: Any, where: str, key: str) -> dict[str, str]:
    if not isinstance(entry, Mapping):
        raise InputError(where, f"rating for {key!r} is not an object")
    decision = entry.get("decision", "")
    if decision not in _DECISIONS:
        raise InputError(where, f"rating for {key!r} has decision {decision!r}; use 'include', 'exclude' or ''")
    comment = entry.get("comment", "")
    if not isinstance(comment, str):
        raise InputError(where, f"rating for {key!r} has a non-text comment")
    return {
        "decision": decision,
        "comment": comment[:_MAX_COMMENT],
        "reviewer": str(entry.get("reviewer", ""))[:200],
        "time": str(entry.get("time", ""))[:64],
    }


def _parse(data: Any, where: str) -> dict[str, dict[str, str]]:
    """Accept ``{"ratings": {path: {...}}}`` or a list of ``{"path": ..., "decision": ...}``."""
    if isinstance(data, Mapping) and isinstance(data.get("ratings"), Mapping):
        items = list(data["ratings"].items())
    elif isinstance(data, list):
        items = []
        for i, entry in enumerate(data):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
                raise InputError(where, f"entry {i} has no 'path'")
            items.append((entry["path"], entry))
    else:
        raise InputError(where, "expected {'ratings': {path: rating}} or a list of ratings with 'path'")
    return {str(k): _validate(v, where, str(k)) for k, v in items}


def load_ratings(output_dir: str | Path) -> dict[str, dict[str, str]]:
    """Ratings stored in ``OUTPUT_DIR`` (empty when none were made)."""
    path = ratings_path(output_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"ratings file is not valid JSON ({exc})") from None
    return _parse(data, str(path))


def save_ratings(output_dir: str | Path, ratings: Mapping[str, Mapping[str, str]]) -> Path:
    text = json.dumps({"version": 1, "ratings": dict(sorted(ratings.items()))}, indent=2) + "\n"
    return atomic_write_text(ratings_path(output_dir), text)


def refresh_table(output_dir: str | Path) -> Any:
    """Re-apply the stored ratings to the curation table and rewrite it; returns the table."""
    from qc.curation import apply_overrides, read_table, write_table

    df = apply_overrides(read_table(output_dir), load_ratings(output_dir))
    write_table(df, output_dir)
    return df


_lock = threading.Lock()


def set_rating(output_dir: str | Path, path: str, decision: str, comment: str = "", reviewer: str = "") -> bool:
    """Record one rating and update the curation table; returns the scan's final ``include``.

    Raises
    ------
    InputError
        When ``path`` is not a scan of the curation table or the decision is invalid.
    """
    from qc.curation import read_table

    entry = _validate({"decision": decision, "comment": comment, "reviewer": reviewer}, "rating", path)
    entry["time"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    with _lock:
        df = read_table(output_dir)
        if path not in set(df["path"]):
            raise InputError(path, "not a scan of the curation table")
        ratings = load_ratings(output_dir)
        ratings[path] = entry
        save_ratings(output_dir, ratings)
        df = refresh_table(output_dir)
    return bool(df.loc[df["path"] == path, "include"].iloc[0])


def import_ratings(output_dir: str | Path, file: str | Path) -> int:
    """Merge an exported ratings file into ``OUTPUT_DIR`` and update the table.

    Later ratings win over stored ones. Ratings of paths not in the table are
    rejected, so a file exported from another dataset cannot slip in.

    Returns
    -------
    int
        Number of ratings imported.
    """
    from qc.curation import read_table

    file = Path(file)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(file, "ratings file does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(file, f"not a JSON ratings file ({exc})") from None
    incoming = _parse(data, str(file))
    with _lock:
        known = set(read_table(output_dir)["path"])
        unknown = sorted(set(incoming) - known)
        if unknown:
            raise InputError(file, f"{len(unknown)} rating(s) for scans not in the curation table, e.g. {unknown[0]!r}")
        ratings = load_ratings(output_dir)
        ratings.update(incoming)
        save_ratings(output_dir, ratings)
        refresh_table(output_dir)
    return len(incoming)


# ----------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    output_dir: Path
    allowed_hosts: frozenset[str]

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("review: " + fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return host in self.allowed_hosts

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "bad Host header"})
        route = unquote(urlparse(self.path).path)
        if route == "/api/ratings":
            try:
                return self._json(HTTPStatus.OK, {"ratings": load_ratings(self.output_dir)})
            except InputError as exc:
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
        if route in ("", "/"):
            route = "/group.html"
        reports = OutputLayout(self.output_dir).reports_dir.resolve()
        target = (reports / route.lstrip("/")).resolve()
        if not target.is_relative_to(reports) or not target.is_file():
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        self._send(HTTPStatus.OK, target.read_bytes(), ctype)

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "bad Host header"})
        if urlparse(self.path).path != "/api/rate":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        if self.headers.get(REVIEW_HEADER) != "1" or not (self.headers.get("Content-Type") or "").startswith(
            "application/json"
        ):
            return self._json(HTTPStatus.FORBIDDEN, {"error": f"JSON body and {REVIEW_HEADER} header required"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > 64_000:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("path"), str):
                raise InputError("request", "body needs a 'path'")
            include = set_rating(
                self.output_dir,
                body["path"],
                body.get("decision", ""),
                body.get("comment", "") or "",
                body.get("reviewer", "") or "",
            )
        except (InputError, json.JSONDecodeError) as exc:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        self._json(HTTPStatus.OK, {"ok": True, "path": body["path"], "include": include})


def make_server(output_dir: str | Path, port: int = 8765) -> ThreadingHTTPServer:
    """A review server for ``OUTPUT_DIR`` bound to 127.0.0.1 (``port=0`` picks a free port).

    Call ``serve_forever()`` on the result; the group report is at ``/``.
    """
    output_dir = Path(output_dir)
    from qc.curation import table_paths

    if not table_paths(output_dir)[0].is_file():
        raise InputError(table_paths(output_dir)[0], "no curation table; run the group level first")
    handler = type(
        "ReviewHandler",
        (_Handler,),
        {"output_dir": output_dir, "allowed_hosts": frozenset({"127.0.0.1", "localhost"})},
    )
    return ThreadingHTTPServer(("127.0.0.1", port), handler)
