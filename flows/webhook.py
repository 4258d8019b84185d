"""CI webhook receiver: a signed "model X has version V at location L" starts the deployments that follow model X.

Open-source Prefect has no webhooks, so this small ASGI app stands in front of the Prefect API.

    POST /hooks/model-version
    X-Enginewright-Timestamp: <unix seconds>
    X-Enginewright-Signature: sha256=<hex of HMAC-SHA256(secret, "<timestamp>." + raw body)>
    {"delivery_id": "ci-4711", "model": "smollm2-135m", "version": "2", "location": "/models/smollm2-135m/v2"}

`model` is a recipe's `model.slug` (its `model.name`, else the file or repository name); every deployment of every
recipe of that model (flows/deploy.py: one per work pool) gets a flow run with `model_version=version` and, when
given, `model_location=location` (the recipe's model.path, or model.id for hub recipes); all other parameters are
the deployment's defaults. `delivery_id` is the CI system's unique id for this delivery; repeating it starts
nothing. A delivery is recorded before its runs are started; if the receiver stopped in between, the retry starts
them (each run's idempotency key, webhook-<delivery_id>-<deployment>, makes Prefect return a run that was already
created instead of starting a second one).

Answers: 202 runs started {"flow_run_ids": [...], ...}; 200 already handled (the same ids), or "duplicate": the
same delivery is being started by another request right now (nothing asked of Prefect); 400 malformed or
invalid JSON ({"field": ...} names the field); 401 missing or wrong signature, or a timestamp that is not 1-12 ASCII
digits or is further than the tolerance from now; 404 no recipe follows the model; 408 body not received in time;
413 body too large; 502 the Prefect API refused (nothing is
recorded, so the CI system may retry; each run's idempotency key keeps a retry from starting a run twice).

Settings (environment): ENGINEWRIGHT_WEBHOOK_SECRET (required, at least 16 characters),
ENGINEWRIGHT_WEBHOOK_TOLERANCE_S (300), ENGINEWRIGHT_WEBHOOK_MAX_BYTES (65536),
ENGINEWRIGHT_WEBHOOK_BODY_TIMEOUT_S (10), ENGINEWRIGHT_WEBHOOK_DB
(default $ENGINEWRIGHT_HOME/webhook/deliveries.db: the delivery ids already handled).

Connections: request headers must be complete within 5 s of a connection's opening (or of its previous response),
and one client IP holds at most 16 open connections (`guarded_protocol`); behind a reverse proxy (README
"Reliability") the proxy is the one client, so give it its own limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tasks.base import settings as names
from tasks.base.settings import settings
from tasks.host import liveness

log = logging.getLogger("enginewright.webhook")

PATH = "/hooks/model-version"
TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
MAX_JSON_DEPTH = 32  # the event is a flat object; deeper JSON is refused before parsing (json recurses per level)
SIGNATURE_HEADER = "X-Enginewright-Signature"
TIMESTAMP_HEADER = "X-Enginewright-Timestamp"

# (deployment full name, parameters, idempotency key, tags) -> flow run id
Launcher = Callable[[str, dict, str, list[str]], Awaitable[str]]


class ModelVersionEvent(BaseModel):
    """The body CI sends. Unknown fields are refused, so a misspelt one is reported rather than ignored."""
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    delivery_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                             description="unique per delivery; a repeated id is not run again")
    model: str = Field(min_length=1, max_length=200, description="a recipe's model.slug, e.g. smollm2-135m")
    version: str = Field(min_length=1, max_length=200, description="the new version's label (tag, revision, build)")
    location: str | None = Field(None, min_length=1, max_length=2000,
                                 description="where the new version is: model.path, or model.id for hub recipes")


@dataclass(frozen=True)
class Settings:
    secret: bytes
    tolerance_s: int = 300
    max_bytes: int = 64 * 1024
    db_path: Path = Path("deliveries.db")
    body_timeout_s: float = 10.0  # a client that has not sent its whole body by then gets 408 and is dropped
    header_timeout_s: float = 5.0  # a connection whose request headers are not complete by then is closed
    max_connections_per_client: int = 16  # open connections per client IP; more are closed at once

    @classmethod
    def from_env(cls) -> "Settings":
        env = settings()
        if len(env.webhook_secret) < 16:
            raise ValueError(f"{names.WEBHOOK_SECRET} must be set to a shared secret of at least 16 characters "
                             "(e.g. `openssl rand -hex 32`)")
        db = env.webhook_db or env.home / "webhook" / "deliveries.db"
        return cls(secret=env.webhook_secret.encode(), tolerance_s=env.webhook_tolerance_s,
                   max_bytes=env.webhook_max_bytes, db_path=Path(db), body_timeout_s=env.webhook_body_timeout_s)


def sign(secret: bytes, timestamp: int | str, body: bytes) -> str:
    """The signature header's value for this body: what the CI system computes."""
    return "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def check_signature(secret: bytes, timestamp: str | None, signature: str | None, body: bytes, *, now: float,
                    tolerance_s: int) -> str | None:
    """Why the request is not authentic, or None when it is. Compares in constant time."""
    if not timestamp or not signature:
        return f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header"
    if not TIMESTAMP_RE.fullmatch(timestamp):  # ASCII digits only ('¹²³'.isdigit() is True), and not 5000 of them
        return f"{TIMESTAMP_HEADER} must be unix seconds (1 to 12 ASCII digits)"
    expected = sign(secret, timestamp, body).encode()
    if not hmac.compare_digest(expected, signature.strip().encode("latin-1", "replace")):
        return "signature does not match the body"
    if abs(now - int(timestamp)) > tolerance_s:  # checked after the signature: a forged timestamp fails above
        return f"timestamp is more than {tolerance_s} s from the receiver's clock (replayed or clock skew)"
    return None


# A delivery recorded as being started by a receiver that is still running is that receiver's to finish, unless it
# has been at it this long (a request that hung or was cancelled without releasing it): then a retry takes it over.
CLAIM_STALE_S = 120.0


class DeliveryLog:
    """Delivery ids already handled, in SQLite: a repeated delivery is answered from here, never run again.

    Each row names the receiver process that is starting its runs (``claimed_by``: host, pid and the pid's start
    time, tasks/host/liveness.py), so a concurrent duplicate (another request, another worker process on the same
    database) is told apart from a delivery whose receiver was killed before it recorded the runs.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS deliveries (delivery_id TEXT PRIMARY KEY, received_at REAL, "
                       "model TEXT, version TEXT, status TEXT, flow_run_ids TEXT, claimed_by TEXT)")
            if "claimed_by" not in {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}:
                db.execute("ALTER TABLE deliveries ADD COLUMN claimed_by TEXT")  # older rows: no live claimer

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def claim(self, event: ModelVersionEvent) -> tuple[bool, dict | None]:
        """(ours, record): ``ours`` when this receiver is to start the delivery's runs — a new delivery (record
        None), or one recorded as started by a receiver that is gone or stuck (its record: a retry after a crash).
        Otherwise the record says why not: 'handled' (its runs are known) or 'started' by a live receiver now (a
        concurrent duplicate). One transaction (BEGIN IMMEDIATE), so two receivers never both take a delivery."""
        me = liveness.owner_token()
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT status, flow_run_ids, model, version, claimed_by, received_at "
                                 "FROM deliveries WHERE delivery_id = ?", (event.delivery_id,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?, 'started', '[]', ?)",
                               (event.delivery_id, time.time(), event.model, event.version, me))
                    return True, None
                record = {"status": row[0], "flow_run_ids": json.loads(row[1]), "model": row[2], "version": row[3]}
                if row[0] == "started" and self._abandoned(row[4], row[5]):
                    db.execute("UPDATE deliveries SET claimed_by = ?, received_at = ? WHERE delivery_id = ?",
                               (me, time.time(), event.delivery_id))
                    return True, record
                return False, record
            finally:
                db.execute("COMMIT")

    @staticmethod
    def _abandoned(claimed_by: str | None, claimed_at: float | None) -> bool:
        if not claimed_by or claimed_at is None or time.time() - claimed_at > CLAIM_STALE_S:
            return True
        host, _, rest = claimed_by.partition(":")
        pid, _, started = rest.partition(":")
        return liveness.gone(host, pid, started) is not None

    def complete(self, delivery_id: str, flow_run_ids: list[str]) -> None:
        with self._lock, self._connect() as db:
            db.execute("UPDATE deliveries SET status = 'handled', flow_run_ids = ? WHERE delivery_id = ?",
                       (json.dumps(flow_run_ids), delivery_id))

    def release(self, delivery_id: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM deliveries WHERE delivery_id = ?", (delivery_id,))


async def prefect_launcher(deployment: str, parameters: dict, idempotency_key: str, tags: list[str]) -> str:
    """Start a flow run of a deployment on the Prefect server at PREFECT_API_URL; returns its id at once."""
    from prefect import get_client

    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        run = await client.create_flow_run_from_deployment(found.id, parameters=parameters,
                                                           idempotency_key=idempotency_key, tags=tags)
    return str(run.id)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _read_limited(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _depth(body: bytes) -> int:
    """Deepest bracket nesting, ignoring brackets inside strings (a linear scan; no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_json(body: bytes) -> tuple[object, str | None]:
    """The body as JSON, or why it is not acceptable JSON: a signed body is still untrusted input (huge integers
    and deep nesting make the json module raise ValueError or RecursionError, not JSONDecodeError)."""
    if _depth(body) > MAX_JSON_DEPTH:
        return None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        return json.loads(body), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 JSON: {exc}"
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, nesting
        return None, f"not JSON: {str(exc)[:200]}"


def _invalid(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(body)"
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    return _error(400, f"{field}: {message}", field=field,
                  problems=[{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()])


def create_app(routes: dict[str, list[str]], settings: Settings, launcher: Launcher = prefect_launcher,
               clock: Callable[[], float] = time.time) -> Starlette:
    """The receiver.

    Args:
        routes: model slug -> full names of the deployments that follow it (flows.deploy.Plan.by_model()).
        settings: secret, tolerance, size limit, delivery database.
        launcher: starts one flow run; the Prefect API by default (tests pass a fake).
        clock: unix time now.
    """
    deliveries = DeliveryLog(settings.db_path)

    async def receive(request: Request) -> JSONResponse:
        try:
            body = await asyncio.wait_for(_read_limited(request, settings.max_bytes), settings.body_timeout_s)
        except asyncio.TimeoutError:
            log.warning("rejected: body not received within %.0f s", settings.body_timeout_s)
            return _error(408, f"body not received within {settings.body_timeout_s:.0f} s")
        if body is None:
            log.warning("rejected: body larger than %d bytes", settings.max_bytes)
            return _error(413, f"body larger than {settings.max_bytes} bytes")
        problem = check_signature(settings.secret, request.headers.get(TIMESTAMP_HEADER),
                                  request.headers.get(SIGNATURE_HEADER), body, now=clock(),
                                  tolerance_s=settings.tolerance_s)
        if problem:
            log.warning("rejected: %s", problem)
            return _error(401, problem)
        data, problem = parse_json(body)
        if problem:
            return _error(400, f"(body): {problem}", field="(body)")
        if not isinstance(data, dict):
            return _error(400, "(body): must be a JSON object", field="(body)")
        try:
            event = ModelVersionEvent.model_validate(data)
        except ValidationError as exc:
            return _invalid(exc)
        deployments = routes.get(event.model.lower())
        if not deployments:
            log.info("delivery %s: no recipe follows model %s", event.delivery_id, event.model)
            return _error(404, f"no recipe follows model '{event.model}'", known_models=sorted(routes))
        ours, seen = deliveries.claim(event)
        if not ours and seen["status"] == "started":  # a concurrent duplicate: the first request is starting them
            log.info("delivery %s: a duplicate of a delivery being started now; nothing asked of Prefect",
                     event.delivery_id)
            return JSONResponse(seen | {"status": "duplicate", "delivery_id": event.delivery_id,
                                        "detail": "this delivery is being started by another request"},
                                status_code=200)
        if not ours:
            log.info("delivery %s: already %s", event.delivery_id, seen["status"])
            return JSONResponse(seen | {"status": f"already {seen['status']}", "delivery_id": event.delivery_id},
                                status_code=200)
        if seen is not None:  # recorded, runs never confirmed: the receiver that took it was killed or got stuck
            log.warning("delivery %s: recorded earlier but its flow runs were never confirmed; starting them now "
                        "(a run that already exists is found by its idempotency key, not started again)",
                        event.delivery_id)
        parameters = {"model_version": event.version} | ({"model_location": event.location} if event.location else {})
        tags = ["webhook", f"model:{event.model.lower()}", f"delivery:{event.delivery_id}"]
        started = []
        try:
            for deployment in deployments:
                run_id = await launcher(deployment, parameters, f"webhook-{event.delivery_id}-{deployment}", tags)
                started.append({"deployment": deployment, "flow_run_id": run_id})
        except asyncio.CancelledError:  # the client went away: release it, so its retry is not taken for a duplicate
            deliveries.release(event.delivery_id)
            raise
        except Exception as exc:  # noqa: BLE001 - nothing recorded: the CI system's retry is safe (idempotency keys)
            deliveries.release(event.delivery_id)
            log.error("delivery %s: Prefect API refused %s: %s", event.delivery_id, deployment, exc)
            return _error(502, f"could not start a flow run of {deployment}: {type(exc).__name__}: {exc}")
        run_ids = [s["flow_run_id"] for s in started]
        deliveries.complete(event.delivery_id, run_ids)
        log.info("delivery %s: model %s version %s -> flow runs %s", event.delivery_id, event.model, event.version,
                 run_ids)
        return JSONResponse({"status": "started", "delivery_id": event.delivery_id, "model": event.model,
                             "version": event.version, "flow_run_ids": run_ids, "flow_runs": started},
                            status_code=202)

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": sorted(routes)})

    return Starlette(routes=[Route(PATH, receive, methods=["POST"]), Route("/health", health, methods=["GET"])])


def guarded_protocol(*, header_timeout_s: float, max_per_client: int):
    """uvicorn's h11 protocol with the two guards uvicorn lacks (read in uvicorn 0.3x's protocols/http/h11_impl.py:
    `timeout_keep_alive` is armed only after a response, so a connection that never completes its first request's
    headers is never timed out, and `limit_concurrency` counts all clients together):

    * a connection whose request headers are not complete within `header_timeout_s` of its opening (or of its
      previous response) is closed;
    * a client IP holding `max_per_client` open connections has further ones closed as soon as they open.

    Each call makes a class of its own, with its own per-IP count (one per server)."""
    from collections import Counter

    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_per_ip: Counter = Counter()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _ip: str | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._ip = self.client[0] if self.client else "unknown"
            open_per_ip[self._ip] += 1
            if open_per_ip[self._ip] > max_per_client:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # no request under way: headers incomplete
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # headers complete: the body's turn
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same time

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._ip is not None:
                open_per_ip[self._ip] -= 1
                if open_per_ip[self._ip] <= 0:
                    del open_per_ip[self._ip]
                self._ip = None
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_config(app, receiver: Settings, *, host: str, port: int, **options):
    """The uvicorn configuration the receiver runs under: the guarded h11 protocol (see guarded_protocol)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(
        header_timeout_s=receiver.header_timeout_s, max_per_client=receiver.max_connections_per_client),
        h11_max_incomplete_event_size=16 * 1024, **options)


def serve(*, host: str, port: int, prefect_file: Path | None = None) -> None:
    """Run the receiver with uvicorn; routes come from prefect.yaml and its recipes (as `enginewright deploy`)."""
    import uvicorn

    from flows.deploy import load_plan

    if not settings().prefect_api_url:
        raise ValueError("PREFECT_API_URL is not set: the receiver starts runs on a Prefect server "
                         "(e.g. http://127.0.0.1:4200/api)")
    receiver = Settings.from_env()
    routes = {model: [d.full_name for d in deps] for model, deps in load_plan(prefect_file).by_model().items()}
    for model, deps in routes.items():
        log.info("model %s -> %s", model, ", ".join(deps))
    uvicorn.Server(uvicorn_config(create_app(routes, receiver), receiver, host=host, port=port,
                                  log_level="info")).run()
