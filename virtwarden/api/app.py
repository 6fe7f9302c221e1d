"""``virtwarden api``: the HTTP API for webhooks and scripts (FastAPI under uvicorn).

Routes: ``POST /v1/restores``, ``GET /v1/jobs`` and ``/v1/jobs/{job_id}``,
``GET /v1/domains/{name}/restore-points``, ``GET /v1/overview`` (the fleet),
``GET|POST /v1/drills``, ``GET /v1/runbooks``, ``POST /v1/runbooks/{name}/runs``,
``POST /v1/alerts`` (Alertmanager), ``GET /v1/alerts``,
``GET /healthz``, ``GET /metrics``, and ``GET /ui`` (the on-call dashboard, a page that
uses those endpoints: virtwarden/api/ui/); the OpenAPI schema is at
``/openapi.json`` and readable at ``/docs`` (rendered here: virtwarden/api/docs_page.py).
Every /v1 request needs a bearer token (virtwarden/api/auth.py)
whose scopes allow the endpoint (virtwarden/api/scopes.py); requests go through the same
``virtwarden.submit`` functions as the CLI, so the API adds no second way of starting a
job. Every POST of an authenticated caller, accepted or refused, and every request
refused for a missing scope leaves an ``audit_log`` row naming the token; requests
without valid credentials, over the size cap or over the rate limit leave none (they
are counted in a metric). Errors are ``{"error": message}``: 401 no valid
credentials, 403 a scope is missing (also ``missing_scope`` and ``endpoint``), 404
unknown domain, point or job, 409 an Idempotency-Key reused for another request, 413
body or alert payload too large, 422 bad input (naming the field), 429 over the
token's rate limit (with Retry-After), 503 catalog or broker down.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException
from starlette.routing import Match

from virtwarden.api.auth import ANONYMOUS, AuthMiddleware, Signatures, Tokens, env_token, read_key
from virtwarden.api.metrics import ApiMetrics, RequestCounter
from virtwarden.api.schemas import (
    AlertmanagerPayload,
    AlertOut,
    DomainOverview,
    DrillIn,
    DrillOut,
    Error,
    JobAccepted,
    JobOut,
    PlanOut,
    PointOut,
    RestoreIn,
    RunbookIn,
)
from virtwarden.api.scopes import (
    ALERTS,
    ANY_RESTORE,
    DRILL,
    READ,
    RUNBOOK,
    ScopeMissing,
    needs,
    require,
    restore_scope,
)
from virtwarden.catalog import alerts as alert_rows
from virtwarden.catalog import api as api_catalog
from virtwarden.catalog import jobs, points
from virtwarden.catalog.models import AuditRecord, utcnow
from virtwarden.catalog.store import Catalog
from virtwarden.config import Config, load_for_process
from virtwarden.errors import (
    ConfigError,
    DestinationRefused,
    NotFound,
    PolicyError,
    Transient,
    UsageError,
    VirtwardenError,
)
from virtwarden.redact import mask

log = logging.getLogger(__name__)
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"  # printable ASCII, no spaces: a UUID is a good key
ACTIONS = {"/v1/restores": "api.restore", "/v1/alerts": "api.alerts", "/v1/drills": "api.drill"}
# (POST /v1/runbooks/NAME/runs is audited by the run itself, as runbook:NAME)
MAX_AUDITED_BODY = 16 * 1024  # a refused body larger than this is recorded by its size only
DESCRIPTION = """\
Restores by webhook, job status, restore points and Alertmanager alerts for virtwarden.

Every `/v1` request needs `Authorization: Bearer <token>`, and the token needs the
scope each endpoint names (`alerts`, `read`, `restore`, `restore-domain`,
`restore-in-place`, or `admin` for all); a missing scope is 403. When the server has an HMAC
key, POSTs to signed endpoints also need `X-Virtwarden-Signature: t=<unix seconds>,
v1=<hex HMAC-SHA256 of "<t>.<raw body>">`, made when sending (a timestamp more than
the tolerance away from the server's clock, or a signature used before, is refused).
`Idempotency-Key` on `POST /v1/restores` makes retries reach the job the first request
started. Errors are `{"error": message}`; 422 also lists `fields`. Bodies over the
configured size and Alertmanager payloads over the configured number of alerts get
413; a token over its rate limit gets 429 with `Retry-After`.
"""


@dataclass(frozen=True)
class Api:
    cfg: Config
    cat: Catalog


class Conflict(VirtwardenError):
    """An Idempotency-Key sent again with a different request."""


class PayloadTooLarge(VirtwardenError):
    """A body that parsed but holds more than the API takes at once (413)."""


# --- the application ---------------------------------------------------------------------
def create_app(cfg: Config, cat: Catalog, tokens: Tokens, signatures: Signatures | None) -> FastAPI:
    # No /docs or /redoc of FastAPI's: they load their scripts from a CDN. /docs is ours.
    app = FastAPI(title="virtwarden", version="1", description=DESCRIPTION, docs_url=None, redoc_url=None,
                  responses={401: {"model": Error}, 403: {"model": Error}, 422: {"model": Error},
                             429: {"model": Error}, 503: {"model": Error}})
    app.state.api = Api(cfg, cat)
    metrics = ApiMetrics(cat)
    app.state.metrics = metrics
    _routes(app)
    _error_handlers(app)
    app.add_middleware(AuthMiddleware, cat=cat, tokens=tokens, signatures=signatures, settings=cfg.api,
                       on_refused=metrics.count_refusal)
    app.add_middleware(RequestCounter, metrics=metrics, route_of=lambda scope: _route_of(app, scope))
    return app


bearer_scheme = HTTPBearer(auto_error=False, description="a token from api.token_file")


def caller(request: Request, _: Any = Depends(bearer_scheme)) -> str:
    """The authenticated caller (the middleware checked the token); named in audit rows."""
    return f"api:{request.state.caller}"


def _routes(app: FastAPI) -> None:
    @app.post("/v1/restores", status_code=202, response_model=JobAccepted | PlanOut, tags=["restores"],
              responses={200: {"model": PlanOut, "description": "with dry_run: what it would do"},
                         404: {"model": Error}, 409: {"model": Error}},
              dependencies=[Depends(_restore_scope)])
    def start_restore(req: RestoreIn, request: Request, response: Response, dry_run: bool = False,
                      actor: str = Depends(caller),
                      idempotency_key: str | None = Header(default=None, pattern=KEY_PATTERN)
                      ) -> JobAccepted | PlanOut:
        """Start a restore; follow it with GET /v1/jobs/{job_id}. With an Idempotency-Key
        header, a repeated request answers 200 with the job the first one started. With
        ``dry_run=true``, the plan only (point, host, destination): nothing starts.
        Scope: `restore` with `to_dir`, `restore-domain` with `as_domain`,
        `restore-in-place` with `in_place` (each covers its `start` and `discard_old`)."""
        api: Api = request.app.state.api
        scope, what = restore_scope(as_domain=req.as_domain is not None, in_place=req.in_place)
        require(request, (scope,), what)  # before anything is looked up, a replayed key included
        if dry_run:
            return _dry_run(api, actor, "api.restore", req, _plan_restore(api, req), response)
        target = req.domain
        if idempotency_key:
            used = api_catalog.key_use(api.cat, idempotency_key)
            if used is not None:
                return _replayed(api, response, used, req, idempotency_key, actor)
        job = _submit_restore(api, req, actor, idempotency_key)
        if idempotency_key:
            # Concurrent retries all reach the one job (its dedup key); the one that
            # stores the key answers 202, the others answer as repeats.
            used, stored = api_catalog.remember_key(api.cat, idempotency_key, req.fingerprint(), job.id, actor)
            if not stored:
                return _replayed(api, response, used, req, idempotency_key, actor)
        audit(api.cat, actor=actor, action="api.restore", target=target, params=req.model_dump(mode="json"),
              outcome="started", job_id=job.id)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobAccepted(job_id=job.id, state=job.state, replayed=False)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={404: {"model": Error}},
             dependencies=[Depends(needs(READ, what="read jobs"))])
    def get_job(job_id: str, request: Request, _: str = Depends(caller)) -> dict[str, Any]:
        """A job's state (queued, running, then succeeded or failed), progress, error and result.
        Scope: `read`."""
        return jobs.get(request.app.state.api.cat, job_id).to_json()

    @app.get("/v1/domains/{name}/restore-points", response_model=list[PointOut], tags=["restores"],
             dependencies=[Depends(needs(READ, what="read restore points"))])
    def restore_points(name: str, request: Request, _: str = Depends(caller)) -> list[dict[str, Any]]:
        """A domain's restore points, oldest first (as ``virtwarden backups NAME --json``).
        Scope: `read`."""
        return [p.to_json() for p in points.for_domain(request.app.state.api.cat, name)]

    @app.post("/v1/alerts", tags=["alerts"], dependencies=[Depends(needs(ALERTS, what="post alerts"))],
              responses={413: {"model": Error},
                         503: {"description": "a service was unreachable: send the alerts again"}},
              response_model=dict[str, Any])  # the 200 body; a 503 is returned as a JSONResponse as is
    def alerts(payload: AlertmanagerPayload, request: Request,
               actor: str = Depends(caller)) -> dict[str, Any] | JSONResponse:
        """Alertmanager's webhook (``webhook_configs`` with this URL and the bearer token).
        Repeats of an alert (same fingerprint and startsAt) change nothing. Scope: `alerts`.
        More alerts than ``api.max_alerts_per_payload`` get 413 and no alert is recorded."""
        from virtwarden import alerts as alert_handling

        api: Api = request.app.state.api
        cap = api.cfg.api.max_alerts_per_payload
        if len(payload.alerts) > cap:
            raise PayloadTooLarge(f"{len(payload.alerts)} alerts in one payload; at most {cap} are taken "
                                  "(api.max_alerts_per_payload): set the receiver's max_alerts to it")
        body = payload.model_dump(mode="json")
        result = alert_handling.receive(api.cfg, api.cat, body, actor)
        job_ids = [a.get("job_id") for a in result.get("actions", []) if isinstance(a, dict) and a.get("job_id")]
        audit(api.cat, actor=actor, action="api.alerts", target=payload.receiver,
              params={"groupKey": payload.groupKey, "status": payload.status,
                      "alerts": [{"fingerprint": a.fingerprint, "status": a.status,
                                  "alertname": a.labels.get("alertname")} for a in payload.alerts]},
              outcome="started" if job_ids else "succeeded", job_id=job_ids[0] if job_ids else None,
              detail=json.dumps(result, default=str)[:2000])
        if result.get("retry"):  # a service was unreachable: a 5xx makes Alertmanager send it again
            return JSONResponse(status_code=503, content=json.loads(json.dumps(result, default=str)))
        return result

    @app.get("/v1/alerts", response_model=list[AlertOut], tags=["alerts"],
             dependencies=[Depends(needs(READ, what="read alerts"))])
    def list_alerts(request: Request, limit: int = Query(100, ge=1, le=1000), host: str | None = None,
                    _: str = Depends(caller)) -> list[dict[str, Any]]:
        """The alerts received, oldest first (the last ``limit``, of ``host`` if given),
        each with what became of it: its outcome, why, and its job. Scope: `read`."""
        return [a.to_json() for a in alert_rows.recent(request.app.state.api.cat, limit=limit, host=host)]

    @app.get("/v1/overview", response_model=list[DomainOverview], tags=["fleet"],
             dependencies=[Depends(needs(READ, what="read the fleet overview"))])
    def fleet(request: Request, _: str = Depends(caller)) -> list[dict[str, Any]]:
        """Every domain the catalog knows: the policy that governs its backups and their
        next slot, its newest good point and its age, its last backup and last drill.
        Scope: `read`."""
        from virtwarden.api import overview

        api: Api = request.app.state.api
        return overview.domains(api.cfg, api.cat, utcnow())

    @app.get("/v1/jobs", response_model=list[JobOut], tags=["jobs"],
             dependencies=[Depends(needs(READ, what="read jobs"))])
    def list_jobs(request: Request, limit: int = Query(50, ge=1, le=500), domain: str | None = None,
                  _: str = Depends(caller)) -> list[dict[str, Any]]:
        """The newest jobs first (of ``domain`` if given), with their progress. Scope: `read`."""
        return [j.to_json() for j in jobs.recent(request.app.state.api.cat, limit=limit, domain=domain)]

    @app.get("/v1/drills", response_model=list[DrillOut], tags=["drills"],
             dependencies=[Depends(needs(READ, what="read drills"))])
    def list_drills(request: Request, limit: int = Query(50, ge=1, le=500), domain: str | None = None,
                    _: str = Depends(caller)) -> list[dict[str, Any]]:
        """The newest drills first (of ``domain`` if given), with their checks. Scope: `read`."""
        from virtwarden.catalog import drills

        return [d.to_json() for d in drills.recent(request.app.state.api.cat, domain=domain, limit=limit)]

    @app.post("/v1/drills", status_code=202, response_model=JobAccepted | PlanOut, tags=["drills"],
              responses={200: {"model": PlanOut, "description": "with dry_run: what it would do"},
                         404: {"model": Error}},
              dependencies=[Depends(needs(DRILL, what="start drills"))])
    def start_drill(req: DrillIn, request: Request, response: Response, dry_run: bool = False,
                    actor: str = Depends(caller)) -> JobAccepted | PlanOut:
        """Start a restore drill; follow it with GET /v1/jobs/{job_id}. With
        ``dry_run=true``, the plan only (the point, host and checks): nothing starts.
        Scope: `drill`."""
        from virtwarden import submit

        api: Api = request.app.state.api
        options: dict[str, Any] = {"point": req.point} if req.point else {}
        if dry_run:
            planned = submit.plan(api.cfg, api.cat, "drill", req.domain, **options)
            return _dry_run(api, actor, "api.drill", req, planned, response)
        job = submit.submit(api.cfg, api.cat, "drill", req.domain, requested_by=actor, **options)
        audit(api.cat, actor=actor, action="api.drill", target=req.domain, params=req.model_dump(mode="json"),
              outcome="started", job_id=job.id)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobAccepted(job_id=job.id, state=job.state, replayed=False)

    @app.get("/v1/runbooks", response_model=list[dict[str, Any]], tags=["runbooks"],
             dependencies=[Depends(needs(READ, what="read runbooks"))])
    def list_runbooks(request: Request, _: str = Depends(caller)) -> list[dict[str, Any]]:
        """The built-in and the operators' runbooks: parameters and steps. Scope: `read`."""
        from virtwarden.policies.loader import load_runbooks

        return [b.summary() for b in load_runbooks(request.app.state.api.cfg.policies_path)]

    @app.post("/v1/runbooks/{name}/runs", status_code=202, response_model=JobAccepted | PlanOut, tags=["runbooks"],
              responses={200: {"model": PlanOut, "description": "with dry_run: every step's plan"},
                         404: {"model": Error}},
              dependencies=[Depends(needs(RUNBOOK, what="run runbooks"))])
    def run_runbook(name: str, body: RunbookIn, request: Request, response: Response, dry_run: bool = False,
                    actor: str = Depends(caller)) -> JobAccepted | PlanOut:
        """Run a runbook: its steps in order, each as a job, driven by this API process
        (follow the run's job with GET /v1/jobs/{job_id}; its result lists each step's
        job). With ``dry_run=true``, every step's plan only. Scope: `runbook`, and the
        scope of each step that has one (a restore's mode, a drill)."""
        from virtwarden import runbooks
        from virtwarden.policies.runbooks import render

        api: Api = request.app.state.api
        book = runbooks.find(api.cfg, name)
        try:
            steps = render(book, body.params)
        except PolicyError as e:  # the request's parameters, not the server's configuration: 422
            raise UsageError(str(e)) from None
        for step in steps:
            needed = _step_scope(step.action, step.args)
            if needed is not None:
                require(request, (needed[0],), f"{needed[1]} (step {step.index} of runbook {name})")
        host = next(iter(api.cfg.hosts))
        if dry_run:
            report = runbooks.dry_run(api.cfg, api.cat, book, body.params, actor)
            response.status_code = 200
            return PlanOut(kind="runbook", domain=None, host=host, plan=report)
        started = runbooks.start(api.cfg, api.cat, book, body.params, actor)
        threading.Thread(target=_drive_runbook, args=(api, started, actor), name=f"runbook-{started.parent.id[:8]}",
                         daemon=True).start()
        response.headers["Location"] = f"/v1/jobs/{started.parent.id}"
        return JobAccepted(job_id=started.parent.id, state=jobs.RUNNING, replayed=False)

    @app.get("/ui", include_in_schema=False, response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        """The on-call dashboard: one page, its script and style packaged with us (no CDN,
        no build step); it reads and acts through the /v1 endpoints with the token typed
        into it (virtwarden/api/ui/)."""
        from virtwarden.api import ui

        return HTMLResponse(ui.page(), headers=ui.HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    def dashboard_asset(name: str) -> Response:
        from virtwarden.api import ui

        if name not in ui.ASSETS:
            raise NotFound(f"no {name} in the dashboard")
        content, media = ui.asset(name)
        return Response(content, media_type=media, headers=ui.HEADERS)

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(request: Request) -> HTMLResponse:
        """The reference, rendered here from the schema: nothing fetched from elsewhere."""
        from virtwarden.api import docs_page

        return HTMLResponse(docs_page.render(request.app.openapi()))

    @app.get("/healthz", tags=["service"], responses={503: {"description": "a dependency is down"}})
    def healthz(request: Request) -> JSONResponse:
        """Whether the catalog and the broker answer (no token needed)."""
        return _health(request.app.state.api)

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse,
             dependencies=[Depends(_metrics_scope)])
    def metrics(request: Request) -> Response:
        """Prometheus text format (see virtwarden/api/metrics.py for the metrics). Scope:
        `read`, unless ``api.metrics_require_token`` is false."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _restore_scope(request: Request) -> None:
    """Before the body is validated: the scope its mode needs, read from the raw JSON
    (any restore scope when that is not an object). The route checks again on the
    validated body, which decides."""
    try:
        raw = json.loads(getattr(request.state, "raw_body", b"") or b"null")
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        require(request, ANY_RESTORE, "start restores")
        return
    scope, what = restore_scope(as_domain=raw.get("as_domain") is not None, in_place=raw.get("in_place") is True)
    require(request, (scope,), what)


def _metrics_scope(request: Request, _: Any = Depends(bearer_scheme)) -> None:
    if request.app.state.api.cfg.api.metrics_require_token:
        require(request, (READ,), "read metrics")


def _step_scope(action: str, args: dict[str, Any]) -> tuple[str, str] | None:
    """The scope a runbook step needs besides ``runbook``: the restore's mode, a drill."""
    if action == "restore":
        return restore_scope(as_domain=bool(args.get("as_domain")), in_place=bool(args.get("in_place")))
    if action == "drill":
        return DRILL, "start drills"
    return None


def _drive_runbook(api: Api, started: Any, actor: str) -> None:
    """A runbook run the API started, step after step, in its own thread. If this
    process dies, the run's lease runs out and a worker fails its job, saying so."""
    from virtwarden import runbooks

    try:
        runbooks.drive(api.cfg, api.cat, started, actor)
    except VirtwardenError as e:
        log.warning("%s", e)
    except Exception:  # a bug: the run's job stays leased until its lease runs out
        log.exception("runbook run %s: internal error", started.parent.id)


def _dry_run(api: Api, actor: str, action: str, req: RestoreIn | DrillIn, planned: Any,
             response: Response) -> PlanOut:
    """A dry run's answer: the plan (a submit.Planned), audited, with 200 (nothing started)."""
    audit(api.cat, actor=actor, action=action, target=req.domain, params=req.model_dump(mode="json"),
          outcome="dry-run")
    response.status_code = 200
    return PlanOut(kind=planned.kind, domain=planned.domain, host=planned.host, plan=planned.preview)


def _restore_options(req: RestoreIn) -> dict[str, Any]:
    return {"point": req.point or "latest", "at": req.at, "to_dir": req.to_dir, "as_domain": req.as_domain,
            "in_place": req.in_place, "discard_old": req.discard_old, "start": req.start, "host": req.host}


def _plan_restore(api: Api, req: RestoreIn) -> Any:  # a submit.Planned
    from virtwarden import submit

    return submit.plan(api.cfg, api.cat, "restore", req.domain, **_restore_options(req))


def _submit_restore(api: Api, req: RestoreIn, actor: str, key: str | None) -> jobs.JobView:
    from virtwarden import submit

    return submit.submit(api.cfg, api.cat, "restore", req.domain, **_restore_options(req),
                         requested_by=actor, dedup_key=f"api:{key}" if key else None)


def _replayed(api: Api, response: Response, used: api_catalog.KeyUse, req: RestoreIn, key: str,
              actor: str) -> JobAccepted:
    if used.request_sha256 != req.fingerprint():
        raise Conflict(f"Idempotency-Key {key!r} was used for a different request (job {used.job_id}); "
                       "use a new key for a new request")
    job = jobs.get(api.cat, used.job_id)
    audit(api.cat, actor=actor, action="api.restore", target=req.domain, params=req.model_dump(mode="json"),
          outcome="succeeded", job_id=job.id, detail=f"repeat of an earlier request (Idempotency-Key {key}); "
                                                    "no new job")
    response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobAccepted(job_id=job.id, state=job.state, replayed=True)


def _health(api: Api) -> JSONResponse:
    from sqlalchemy import text

    from virtwarden.worker import celery_app

    checks: dict[str, str] = {}
    try:
        with api.cat.session() as s:
            s.execute(text("SELECT 1"))
        checks["catalog"] = "ok"
    except VirtwardenError as e:  # no token needed here: no password either
        checks["catalog"] = mask(str(e))
    try:
        celery_app.check_broker(api.cfg)
        checks["broker"] = "ok"
    except VirtwardenError as e:
        checks["broker"] = mask(str(e))
    down = [name for name, state in checks.items() if state != "ok"]
    body: dict[str, Any] = {"status": "ok" if not down else "unavailable", **checks}
    if down:
        body["error"] = f"{' and '.join(down)} unavailable"
    return JSONResponse(body, status_code=503 if down else 200)


# --- errors and the audit log ------------------------------------------------------------
def status_for(e: VirtwardenError) -> int:
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, Conflict):
        return 409
    if isinstance(e, (ScopeMissing, DestinationRefused)):
        return 403  # not for this caller, or a destination restores may not write to
    if isinstance(e, PayloadTooLarge):
        return 413
    if isinstance(e, Transient):
        return 503
    if isinstance(e, ConfigError):
        return 500  # the server's configuration or policies, not the request
    return 422


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in kind:
            message = f"send the body as JSON with Content-Type: application/json (got {kind or 'none'!r})"
            await _refused(request, message, 415)
            return JSONResponse({"error": message}, status_code=415)
        fields = [{"field": _field(e), "message": _message(e)} for e in exc.errors()]
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        await _refused(request, message, 422)
        return JSONResponse({"error": message, "fields": fields}, status_code=422)

    @app.exception_handler(VirtwardenError)
    async def product_error(request: Request, exc: VirtwardenError) -> JSONResponse:
        status = status_for(exc)
        body: dict[str, Any] = {"error": mask(str(exc))}
        if isinstance(exc, ScopeMissing):
            body.update(missing_scope=exc.missing_scope, endpoint=exc.endpoint)
            request.app.state.metrics.count_refusal("missing-scope")
        elif isinstance(exc, PayloadTooLarge):
            request.app.state.metrics.count_refusal("too-many-alerts")
        await _refused(request, body["error"], status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed (a bug)", request.method, request.url.path, exc_info=exc)
        await _refused(request, f"internal error: {type(exc).__name__}", 500)
        return JSONResponse({"error": "internal error (a bug): the API's log has the details"}, status_code=500)


def _field(error: dict[str, Any]) -> str:
    """``body.alerts.0.fingerprint`` -> ``alerts.0.fingerprint``; a header by its name."""
    parts = [str(p) for p in error["loc"]]
    if error["type"] == "json_invalid" or parts == ["body"]:
        return "body"
    if parts[0] == "header":
        return "-".join(w.capitalize() for w in parts[1].split("-")) + " header"
    return ".".join(parts[1:] if parts[0] == "body" else parts)


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "json_invalid":
        return f"not valid JSON ({error.get('ctx', {}).get('error', 'parse error')} at character {error['loc'][-1]})"
    if error["loc"][:2] == ("header", "idempotency-key"):
        return "must be 1 to 200 printable ASCII characters without spaces (a UUID is a good key)"
    return str(error["msg"]).removeprefix("Value error, ")


async def _refused(request: Request, why: str, status: int) -> None:
    from starlette.concurrency import run_in_threadpool

    caller_name = getattr(request.state, "caller", ANONYMOUS)
    await run_in_threadpool(_audit_refused, request.app.state.api.cat, request.scope, caller_name, why, status)


def _audit_refused(cat: Catalog, scope: MutableMapping[str, Any], caller_name: str, why: str, status: int) -> None:
    """An audit row for an authenticated caller's refused POST, or any request refused
    for a missing scope. Requests without valid credentials never get here: the
    middleware refuses them, and only counts them."""
    if scope["method"] != "POST" and status != 403:
        return
    params: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "status": status}
    if scope.get("client"):
        params["client"] = scope["client"][0]
    raw = scope.get("state", {}).get("raw_body")
    if caller_name != ANONYMOUS and raw:
        params["body"] = _json_or_text(raw) if len(raw) <= MAX_AUDITED_BODY else f"<{len(raw)} bytes>"
    body = params.get("body")
    target = (body.get("domain") or body.get("receiver")) if isinstance(body, dict) else None
    try:
        audit(cat, actor=ANONYMOUS if caller_name == ANONYMOUS else f"api:{caller_name}",
              action=ACTIONS.get(scope["path"].rstrip("/"), f"api.{scope['method'].lower()}"),
              target=target if isinstance(target, str) else None, params=params, outcome="refused",
              detail=why[:2000])
    except VirtwardenError as e:
        log.error("could not write the audit record of a refused request (%s): %s", why, e)


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw[:1000].decode("utf-8", "replace")


def audit(cat: Catalog, *, actor: str, action: str, target: str | None, params: dict[str, Any], outcome: str,
          job_id: str | None = None, detail: str | None = None) -> None:
    with cat.session() as s:
        s.add(AuditRecord(at=utcnow(), actor=actor, action=action, target=target, params=params, job_id=job_id,
                          outcome=outcome, detail=detail, finished_at=utcnow()))


def _route_of(app: FastAPI, scope: dict[str, Any]) -> str:
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "other"


# --- the command ---------------------------------------------------------------------------
def cli(args: argparse.Namespace) -> int:
    import uvicorn

    from virtwarden.worker import celery_app

    cfg = load_for_process(args.config)
    host, port = parse_listen(args.listen or cfg.api.listen)
    tokens = Tokens(cfg.api.token_file, env_token())
    signatures = None
    if cfg.api.hmac_key_file:
        signatures = Signatures(read_key(cfg.api.hmac_key_file), cfg.api.signature_tolerance_seconds,
                                cfg.api.signed_endpoints)
    cat = Catalog(cfg.catalog_url)
    celery_app.configure(cfg)
    app = create_app(cfg, cat, tokens, signatures)
    log.warning("virtwarden api listening on http://%s:%d (signatures %s)", host, port,
                "required for " + ", ".join(cfg.api.signed_endpoints) if signatures else "off")
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                server_header=False, log_config=_masked_log_config())
    return 0


def _masked_log_config() -> dict:
    """uvicorn's own logging, its handlers masking passwords like the root logger's
    (an access log line carries the query string)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["mask"] = {"()": "virtwarden.redact.MaskingFilter"}
    for handler in config.get("handlers", {}).values():
        handler.setdefault("filters", []).append("mask")
    return config


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"api.listen: {value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host, int(port)
