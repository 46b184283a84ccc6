"""`/api/v1`: the JSON API the pages use and scripts may call.

Every route is a thin call into `migrating_proxy.admin`, the code behind the CLI, and answers
with the CLI's `--json` keys: `GET /domains` is `domain list --json`, `GET /status` is
`status --json`, `POST /migrate` is `migrate --json`, and so on. Paged lists say how many rows
match in the `X-Total-Count` header, so the body stays exactly the CLI's list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from migrating_proxy.admin import domains, views
from migrating_proxy.admin.cutover import export, finish
from migrating_proxy.admin.imports import ImportRefused, import_users
from migrating_proxy.admin.operations import Outcome, select_accounts
from migrating_proxy.cacerts import CAFileError, checked_ca_pem
from migrating_proxy.store import AddressError, StoreError
from migrating_proxy.store import audit as audit_trail
from migrating_proxy.store.status import SORTABLE, STATES, StatusQuery
from migrating_proxy.web import models
from migrating_proxy.web.auth import Principal, admin, console_of

MAX_UPLOAD = 20 * 1024 * 1024  # bytes of CSV; a file of 100,000 users is a few MB
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": models.Error, "description": "refused: the reason, worded as the CLI's"},
    401: {"model": models.Error, "description": "no valid session or API token"},
    403: {"model": models.Error, "description": "a session's request without its CSRF token"},
    422: {"description": "malformed request"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": models.Error, "description": "no such domain or account"}}


class NotFound(StoreError):
    """A domain or account named in the request does not exist: 404."""


def known_domain(request: Request, name: str) -> str:
    if console_of(request).store.accounts.get_domain(name) is None:
        raise NotFound(f"unknown domain {name}")
    return name


def known_accounts(request: Request, addresses: list[str]) -> list[str]:
    """The addresses, if each is an account (one that cannot be an address is none either)."""
    accounts = console_of(request).store.accounts
    for address in addresses:
        try:
            found = accounts.get_account(address)
        except AddressError:
            found = None
        if found is None:
            raise NotFound(f"unknown account {address}")
    return addresses


router = APIRouter(prefix="/api/v1", dependencies=[Depends(admin)], responses=ERRORS)
Caller = Annotated[Principal, Depends(admin)]
SortKey = Literal[tuple(f"{sign}{key}" for key in SORTABLE for sign in ("", "-"))]  # type: ignore[misc]


# -- domains ------------------------------------------------------------------------------
@router.get("/domains", response_model=list[models.DomainOut], tags=["domains"])
def list_domains(request: Request) -> list[dict[str, Any]]:
    """Every domain, as `domain list --json`."""
    return domains.domain_rows(console_of(request).store)


@router.post("/domains", response_model=models.DomainOut, status_code=201, tags=["domains"])
def add_domain(body: models.DomainAdd, request: Request, caller: Caller) -> dict[str, Any]:
    """`domain add`."""
    console = console_of(request)
    domain = domains.build_domain(body.name, {
        "source": [url for url in (body.source, body.pop3_source) if url], "relay": body.relay,
        "type": body.type, "source_user": body.source_user,
        "subscribed_only": body.subscribed_only, "notice": not body.no_notice,
        "verify_tls": not body.no_verify_tls, "cutover": body.cutover, "engine": body.engine,
        "source_ca": _source_ca(body.source_ca),
    }, disabled=body.disabled)
    return domains.domain_dict(domains.add_domain(console.store, console.config, caller.actor,
                                                  domain))


def _source_ca(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return checked_ca_pem(text, "source_ca")
    except CAFileError as exc:
        raise StoreError(str(exc)) from None


@router.post("/domains/{name}/enable", response_model=models.DomainOut, tags=["domains"],
             responses=NOT_FOUND)
def enable_domain(name: models.Name, request: Request, caller: Caller) -> dict[str, Any]:
    """`domain enable`: switch the domain's migration on (from the next login)."""
    return _switch(request, caller, name, True)


@router.post("/domains/{name}/disable", response_model=models.DomainOut, tags=["domains"],
             responses=NOT_FOUND)
def disable_domain(name: models.Name, request: Request, caller: Caller) -> dict[str, Any]:
    """`domain disable`: switch the domain's migration off."""
    return _switch(request, caller, name, False)


def _switch(request: Request, caller: Caller, name: str, on: bool) -> dict[str, Any]:
    known_domain(request, name)
    return domains.domain_dict(domains.set_migrating(console_of(request).store, caller.actor,
                                                     name, on))


@router.delete("/domains/{name}", status_code=204, tags=["domains"], responses=NOT_FOUND)
def remove_domain(name: models.Name, request: Request, caller: Caller) -> Response:
    """`domain remove` (refused while the domain has accounts)."""
    domains.remove_domain(console_of(request).store, caller.actor, known_domain(request, name))
    return Response(status_code=204)


@router.get("/totals", response_model=dict[str, models.Totals], tags=["domains"])
def domain_totals(request: Request) -> dict[str, dict[str, Any]]:
    """Per domain: accounts in each state and the progress counters summed (recomputed at
    most every 2 seconds)."""
    return console_of(request).totals()


# -- status -------------------------------------------------------------------------------
@router.get("/status", response_model=list[models.StatusRow], tags=["accounts"],
            responses=NOT_FOUND)
def status(request: Request, response: Response,
           domain: models.Name | None = None,
           # A few in the URL (its length is bounded); more: by domain, state or search.
           address: Annotated[list[models.Address], Query(max_length=20)] = [],  # noqa: B006
           state: Literal[STATES] | None = None,  # type: ignore[valid-type]
           q: Annotated[str, Query(max_length=320, pattern=models.NO_CONTROLS)] = "",
           sort: SortKey = "address",  # type: ignore[valid-type]
           limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
           offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> list[dict[str, Any]]:
    """`status [ADDRESS...] [--domain D] --json`; filtered (`state`, `q`: part of the address),
    sorted (`sort`, `-` first for descending) and paged (`limit`, `offset`) on request."""
    if domain is not None:
        known_domain(request, domain)
    ask = StatusQuery(domain=domain, addresses=tuple(known_accounts(request, address)),
                      state=state, search=q,
                      sort=sort.lstrip("-"), descending=sort.startswith("-"), limit=limit,
                      offset=offset)
    total, rows = views.status_query(console_of(request).store, ask)
    response.headers["X-Total-Count"] = str(total)
    return rows


# -- actions ------------------------------------------------------------------------------
def _run(request: Request, caller: Principal, action: str,
         body: models.Selection) -> list[dict[str, Any]]:
    console = console_of(request)
    if body.domain is not None:
        known_domain(request, body.domain)
    targets = select_accounts(console.store, known_accounts(request, body.addresses),
                              body.domain, body.all)
    if body.prestage:
        if action != "migrate":
            raise StoreError("prestage is an option of migrate only")
        action = "prestage"
    outcomes: list[Outcome] = getattr(console.operations(caller.actor), action)(targets)
    return [outcome.as_dict() for outcome in outcomes]


PASS_ACTIONS = {
    "migrate": "`migrate --json`: check each password at the old server, then queue a full pass.",
    "resync": "`resync --json`: queue an incremental pass (mail that arrived since).",
    "stop": "`stop --json`: pause passes at the next batch boundary.",
    "start": "`start --json`: resume paused passes where they stopped.",
}


def _pass_route(action: str) -> Callable[..., list[dict[str, Any]]]:
    def route(body: models.Selection, request: Request, caller: Caller) -> list[dict[str, Any]]:
        return _run(request, caller, action, body)

    return route


for _action, _description in PASS_ACTIONS.items():
    router.add_api_route(f"/{_action}", _pass_route(_action), methods=["POST"], name=_action,
                         response_model=list[models.OutcomeOut], tags=["actions"],
                         responses=NOT_FOUND,
                         summary=_action.capitalize(), description=_description)


@router.post("/import", response_model=models.ImportSummary, tags=["actions"],
             responses={400: {"model": models.ImportRefusal,
                              "description": "nothing imported: every bad line"}})
def import_csv(request: Request, caller: Caller, file: Annotated[UploadFile, File()],
               dry_run: Annotated[bool, Form()] = False) -> Any:
    """`import FILE [--dry-run] --json`, the file uploaded. Nothing is imported unless every
    line is valid; a refusal lists every bad line (line, column, reason)."""
    data = file.file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise StoreError(f"file larger than {MAX_UPLOAD // 1024 // 1024} MB; nothing imported")
    name = (file.filename or "upload.csv")[:255]
    try:
        return import_users(console_of(request).operations(caller.actor), data, name, dry_run)
    except ImportRefused as refused:
        return JSONResponse({"error": str(refused),
                             "bad_lines": [bad.as_dict() for bad in refused.bad_lines]}, 400)


@router.post("/finish", response_model=models.FinishReport, tags=["actions"],
             responses=NOT_FOUND)
def finish_domain(body: models.FinishRequest, request: Request,
                  caller: Caller) -> dict[str, Any]:
    """`finish DOMAIN --yes --json`: final pass for every migrated account (waited for), the
    domain's migration switched off, passwords no longer needed erased; the report."""
    console = console_of(request)
    known_domain(request, body.domain)
    if not body.confirm:
        raise StoreError("not confirmed; nothing changed")
    return finish(console.operations(caller.actor), body.domain)


@router.get("/export", tags=["actions"], responses={
    **NOT_FOUND, 200: {"description": "the accounts, as a file",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}})
def export_domain(domain: models.Name, format: models.ExportFormat, request: Request,
                  caller: Caller) -> Response:
    """`export DOMAIN --format F`: every account and its password hash, as a download."""
    text = export(console_of(request).store, known_domain(request, domain), format, caller.actor)
    suffix = "csv" if format == "csv" else "passwd"
    return PlainTextResponse(text, headers={
        "Content-Disposition": f'attachment; filename="{domain.lower()}-accounts.{suffix}"'})


# -- audit --------------------------------------------------------------------------------
@router.get("/audit", response_model=list[models.AuditEntry], tags=["audit"])
def audit(request: Request, response: Response,
          action: Annotated[str | None, Query(max_length=32, pattern=models.NO_CONTROLS)] = None,
          limit: Annotated[int, Query(ge=1, le=1000)] = 100,
          offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> list[dict[str, Any]]:
    """The audit trail of admin actions (CLI, console and API), newest first."""
    total, entries = audit_trail.entries(console_of(request).store.engine, limit, offset, action)
    response.headers["X-Total-Count"] = str(total)
    return entries
