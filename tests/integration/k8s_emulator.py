"""An in-process stand-in for the Kubernetes API server's ome.io/v1beta1 endpoints, for the official
client over real HTTP: validates every created object against OME's CRD schema (422 Invalid, as
the API server answers), flips InferenceServices to Ready, and deletes with a short delay.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from tests import ome_schema

_ROUTE = re.compile(
    r"^/apis/ome\.io/v1beta1(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<plural>inferenceservices|clusterservingruntimes|clusterbasemodels)(?:/(?P<name>[^/?]+))?"
)
_KINDS = {
    "inferenceservices": "InferenceService",
    "clusterservingruntimes": "ClusterServingRuntime",
    "clusterbasemodels": "ClusterBaseModel",
}


@dataclass
class Emulator:
    """The emulator's state and behaviour.

    ``ready_after_s``: an InferenceService reports Ready (with ``status.url = url_for(obj)``) this
    long after its creation, unless its name is in ``never_ready`` (then Ready is False, reason
    EngineFailed). ``delete_after_s``: a deleted object stays (with a deletionTimestamp) this long.
    ``created`` and ``rejected`` record every create call (kind, name) and every 422 message.
    """

    url_for: Callable[[dict[str, Any]], str] = lambda obj: f"http://{obj['metadata']['name']}.svc"
    ready_after_s: float = 0.3
    delete_after_s: float = 0.3
    never_ready: set[str] = field(default_factory=set)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    created: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    url: str = ""
    _times: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def kinds(self) -> list[tuple[str, str]]:
        """(kind, name) of every object stored now."""
        with self._lock:
            return sorted((o["kind"], o["metadata"]["name"]) for o in self.objects.values())

    # request handling (called from the server's threads)

    def handle(
        self, method: str, path: str, body: bytes, query: str = ""
    ) -> tuple[int, dict[str, Any]]:
        m = _ROUTE.match(path)
        if not m:
            return 404, _status(404, "NotFound", f"no route {path}")
        plural, ns, name = m["plural"], m["ns"] or "", m["name"]
        kind = _KINDS[plural]
        with self._lock:
            self._expire()
            if method == "POST" and name is None:
                return self._create(plural, kind, ns, json.loads(body or b"{}"))
            if method == "GET" and name is None:
                return 200, self._list(plural, kind, ns, parse_qs(query))
            key = (plural, ns, name or "")
            obj = self.objects.get(key)
            if obj is None:
                return 404, _status(404, "NotFound", f'{plural} "{name}" not found')
            if method == "GET":
                self._update_status(key, obj)
                return 200, obj
            if method == "DELETE":
                obj["metadata"].setdefault("deletionTimestamp", _now())
                self._times[("delete", *key)] = time.monotonic() + self.delete_after_s
                return 200, obj
        return 405, _status(405, "MethodNotAllowed", method)

    def _create(
        self, plural: str, kind: str, ns: str, obj: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        errors = ome_schema.errors(obj)
        if obj.get("kind") != kind:
            errors.append(f"kind: {obj.get('kind')!r} posted to {plural}")
        if ns and obj.get("metadata", {}).get("namespace", ns) != ns:
            errors.append("metadata.namespace: does not match the namespace of the request")
        if errors:
            message = f"{kind} is invalid: " + "; ".join(errors)
            self.rejected.append(message)
            return 422, _status(422, "Invalid", message)
        name = obj["metadata"]["name"]
        key = (plural, ns, name)
        if key in self.objects:
            return 409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists')
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion="1")
        meta.update(generation=1)
        if ns:
            meta["namespace"] = ns
        obj["status"] = {}
        self.objects[key] = obj
        self._times[key] = time.monotonic()
        self.created.append((kind, name))
        return 201, obj

    def _list(self, plural: str, kind: str, ns: str, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = dict(
            term.split("=", 1) for sel in query.get("labelSelector", []) for term in sel.split(",")
        )
        items = [
            o
            for (p, o_ns, _), o in self.objects.items()
            if p == plural and o_ns == ns
            and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]  # fmt: skip
        return {"apiVersion": "ome.io/v1beta1", "kind": f"{kind}List", "metadata": {},
                "items": items}  # fmt: skip

    def _update_status(self, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
        if obj["kind"] != "InferenceService" or "deletionTimestamp" in obj["metadata"]:
            return
        if time.monotonic() - self._times[key] < self.ready_after_s:
            return
        name = obj["metadata"]["name"]
        if name in self.never_ready:
            cond = {"type": "Ready", "status": "False", "reason": "EngineFailed",
                    "message": "engine pod CrashLoopBackOff"}  # fmt: skip
            obj["status"] = {"conditions": [cond]}
        else:
            cond = {"type": "Ready", "status": "True", "lastTransitionTime": _now()}
            obj["status"] = {"conditions": [cond], "url": self.url_for(obj)}

    def _expire(self) -> None:
        now = time.monotonic()
        for tkey, when in list(self._times.items()):
            if tkey[0] == "delete" and now >= when:
                key = (str(tkey[1]), str(tkey[2]), str(tkey[3]))
                self.objects.pop(key, None)
                del self._times[tkey]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


@contextmanager
def running_emulator(emulator: Emulator | None = None) -> Iterator[Emulator]:
    """Serve ``emulator`` on 127.0.0.1 (a free port) in a thread; its ``url`` is set meanwhile."""
    emu = emulator or Emulator()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path, _, query = self.path.partition("?")
            code, payload = emu.handle(self.command, path, body, query)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    emu.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield emu
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
