"""Who is asking: a login session (browser) or an API token (scripts); CSRF; login, logout.

- Sessions: a random id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` under TLS),
  stored server-side as its digest, expiring after `web.session_lifetime` seconds unused.
- CSRF: a state-changing request made with a session must carry the session's token in the
  `X-CSRF-Token` header (the pages' script sends it) or, for plain forms, a `csrf_token` field.
  A request with an API token (`Authorization: Bearer ...`) carries no ambient credential, so
  it needs none. The login form uses a double-submit cookie, as there is no session yet.
- Login throttling: the mail front-ends' `FailureThrottle` and `auth_failure_delay`.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from migrating_proxy.admin import Actor
from migrating_proxy.admin.users import check_login
from migrating_proxy.store.admins import AdminUser
from migrating_proxy.web.console import Console
from migrating_proxy.web.render import render

log = structlog.get_logger(__name__)

SESSION_COOKIE = "mp_session"
LOGIN_COOKIE = "mp_login"  # the login form's double-submit CSRF value
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

router = APIRouter(include_in_schema=False)


class NotAuthenticated(Exception):
    """No valid session or token: 401 (the API) or the login form (pages)."""


class CSRFRefused(Exception):
    """A state-changing request of a session without its CSRF token: 403."""


@dataclass(frozen=True)
class Principal:
    user: AdminUser
    via: str  # web (session) | api (token)
    csrf_token: str | None = None

    @property
    def actor(self) -> Actor:
        return Actor(self.user.name, self.via)


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def authenticate(request: Request) -> Principal | None:
    console = console_of(request)
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        user = console.admins.user_for_token(credentials.strip())
        return Principal(user, "api") if user else None
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return None
    session = console.admins.session(session_id, console.config.web.session_lifetime)
    return Principal(session.user, "web", session.csrf_token) if session else None


# Declared for the OpenAPI document (the security schemes); `authenticate` reads both itself.
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="token",
                           description="`migrating-proxy admin-user token NAME`")
cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, scheme_name="session",
                             description="a login session (POST /login); state changes also "
                                         f"need its CSRF token in `{CSRF_HEADER}`")


def admin(request: Request,
          _token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
          _session: Annotated[str | None, Depends(cookie_scheme)]) -> Principal:
    """The dependency of every protected route (sync: FastAPI runs it in a thread)."""
    principal = authenticate(request)
    if principal is None:
        raise NotAuthenticated()
    if request.method not in SAFE_METHODS and principal.csrf_token is not None:
        check_csrf(principal.csrf_token, request.headers.get(CSRF_HEADER))
    return principal


def check_csrf(expected: str, given: str | None) -> None:
    if not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise CSRFRefused()


def peer_of(request: Request) -> str:
    return request.client.host if request.client else ""


def set_cookie(response: Response, console: Console, name: str, value: str,
               path: str = "/") -> None:
    response.set_cookie(name, value, path=path, httponly=True, samesite="strict",
                        secure=console.tls)


# -- login and logout ---------------------------------------------------------------------
def login_form(request: Request, status: int = 200, error: str = "",
               next_path: str = "/") -> Response:
    """The login page, with a fresh double-submit token (also the answer to a page request
    without a session: 401 with the form, so the browser shows it in place)."""
    console = console_of(request)
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", {"csrf_token": token, "error": error,
                                              "next": safe_next(next_path)}, status)
    set_cookie(response, console, LOGIN_COOKIE, token, path="/login")
    return response


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:
    return login_form(request, next_path=next)


@router.post("/login")
def login(request: Request, name: Annotated[str, Form()] = "",
          password: Annotated[str, Form()] = "", csrf_token: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "/") -> Response:
    console = console_of(request)
    check_csrf(request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(), csrf_token)
    peer, key = peer_of(request), name.lower()[:64]
    attempt = console.throttle.reserve(peer, key)  # before the password is looked at
    if attempt is None:
        log.warning("web_login", user=name[:64], peer=peer, result="throttled")
        return login_form(request, 429, "Too many failed logins: try again later.", next)
    try:
        user = check_login(console.store, console.hasher, name, password) if name else None
    except BaseException:
        console.throttle.cancel(attempt)  # undecided: no password was found wrong
        raise
    if user is None:
        console.throttle.failed(attempt)
        log.warning("web_login", user=name[:64], peer=peer, result="failed")
        time.sleep(console.config.limits.auth_failure_delay)  # the same wait for every failure
        return login_form(request, 401, "Wrong name or password.", next)
    console.throttle.succeeded(attempt)
    session_id, _ = console.admins.open_session(user, console.config.web.session_lifetime)
    log.info("web_login", user=user.name, peer=peer, result="ok")
    response = RedirectResponse(safe_next(next), status_code=303)
    set_cookie(response, console, SESSION_COOKIE, session_id)
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, principal: Annotated[Principal | None, Depends(authenticate)],
           csrf_token: Annotated[str, Form()] = "") -> Response:
    if principal is None or principal.csrf_token is None:
        raise NotAuthenticated()
    check_csrf(principal.csrf_token, csrf_token)
    console_of(request).admins.close_session(request.cookies.get(SESSION_COOKIE, ""))
    log.info("web_logout", user=principal.user.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def safe_next(path: str) -> str:
    """Only a path of this site: never `//elsewhere` or `https://elsewhere`."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return quote(path, safe="/?=&%-._~")
