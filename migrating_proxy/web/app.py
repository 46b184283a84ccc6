"""The console's FastAPI application: routers, static files, headers, errors."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from migrating_proxy.endpoints import EndpointError
from migrating_proxy.store import AddressError, DatabaseError, StoreError
from migrating_proxy.web import api, auth, pages
from migrating_proxy.web.console import Console
from migrating_proxy.web.render import render

log = structlog.get_logger(__name__)

# Scripts and styles only from this site (none inline), no framing, no referrer leaks.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def create_app(console: Console) -> FastAPI:
    app = FastAPI(
        title="migrating-proxy", version="1",
        description="The admin API of migrating-proxy: the CLI's commands and their `--json` "
                    "answers. Authenticate with a login session (and its CSRF token in "
                    "`X-CSRF-Token` for changes) or `Authorization: Bearer <token>` "
                    "(`migrating-proxy admin-user token NAME`).",
        openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None,
    )
    app.state.console = console
    app.include_router(auth.router)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), "static")
    app.middleware("http")(_headers)
    app.middleware("http")(_fresh_totals_after_changes)
    _error_handlers(app)
    return app


async def _headers(request: Request,
                   call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    if not request.url.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


async def _fresh_totals_after_changes(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """A change made from the console shows in the totals at once, not up to 2 s later."""
    response = await call_next(request)
    if request.method not in auth.SAFE_METHODS:
        request.app.state.console.forget_totals()
    return response


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method of an API path, from the OpenAPI document (FastAPI caches it)."""
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            methods = {method.upper() for method in operations}
            return sorted(methods | ({"HEAD"} if "GET" in methods else set()))
    return []


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _error_handlers(app: FastAPI) -> None:
    def error(request: Request, status: int, message: str) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": message}, status)
        return render(request, "error.html", {"status": status, "message": message}, status)

    @app.exception_handler(auth.NotAuthenticated)
    def not_authenticated(request: Request, exc: auth.NotAuthenticated) -> Response:
        if _wants_json(request) or request.method != "GET":
            return JSONResponse({"error": "log in, or send an API token"}, 401)
        return auth.login_form(request, 401, "", request.url.path)

    @app.exception_handler(auth.CSRFRefused)
    def csrf_refused(request: Request, exc: auth.CSRFRefused) -> Response:
        log.warning("web_csrf_refused", path=request.url.path)
        return error(request, 403, "missing or wrong CSRF token; reload the page")

    @app.exception_handler(api.NotFound)
    def not_found(request: Request, exc: api.NotFound) -> Response:
        return error(request, 404, str(exc))

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own refusals (no such route, wrong method, unreadable body), worded
        like ours: {"error": ...}, and a 405's `Allow` naming every method of the path."""
        answer = error(request, exc.status_code, str(exc.detail))
        if exc.status_code == 405:
            methods = allowed_methods(app, request.url.path)
            answer.headers["Allow"] = (", ".join(methods) if methods else
                                       (exc.headers or {}).get("Allow", ""))
        return answer

    @app.exception_handler(StoreError)
    @app.exception_handler(AddressError)
    @app.exception_handler(EndpointError)
    def refused(request: Request, exc: Exception) -> Response:
        return error(request, 400, str(exc))

    @app.exception_handler(DatabaseError)
    def database_down(request: Request, exc: DatabaseError) -> Response:
        return error(request, 503, str(exc))

    @app.exception_handler(RequestValidationError)
    def malformed(request: Request, exc: RequestValidationError) -> Response:
        details = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(details) or "malformed request"}, 422)
