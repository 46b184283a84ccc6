"""The console's pages: server-rendered shells that `static/app.js` fills from `/api/v1`.

A page is only layout, forms and the data the script needs to start (the domain's name, the
CSRF token); every figure on it comes from the same API calls a script would make.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from migrating_proxy.config import ENGINES
from migrating_proxy.store.accounts import CUTOVER_MODES, DOMAIN_TYPES
from migrating_proxy.store.status import STATES
from migrating_proxy.web.api import known_domain
from migrating_proxy.web.auth import Principal, admin
from migrating_proxy.web.render import render

router = APIRouter(include_in_schema=False)
Caller = Annotated[Principal, Depends(admin)]


def _page(request: Request, principal: Principal, name: str, **context: Any) -> Response:
    return render(request, name, {"user": principal.user.name,
                                  "csrf_token": principal.csrf_token or "", **context})


@router.get("/")
def domains_page(request: Request, principal: Caller) -> Response:
    return _page(request, principal, "domains.html", title="Domains", types=DOMAIN_TYPES,
                 cutover_modes=CUTOVER_MODES, engines=ENGINES)


@router.get("/domains/{name}")
def accounts_page(name: str, request: Request,
                  principal: Caller) -> Response:
    domain = known_domain(request, name).lower()
    return _page(request, principal, "accounts.html", title=domain, domain=domain,
                 states=STATES)


@router.get("/audit")
def audit_page(request: Request, principal: Caller) -> Response:
    return _page(request, principal, "audit.html", title="Audit trail")
