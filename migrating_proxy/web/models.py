"""The API's request and response shapes, for validation and the OpenAPI document.

Responses allow extra keys: they are the dicts the CLI's `--json` prints (built by the same
functions), so a key added there appears in the API and the document stays true.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from migrating_proxy.admin.cutover import EXPORT_FORMATS
from migrating_proxy.config import ENGINES
from migrating_proxy.store.accounts import CUTOVER_MODES, DOMAIN_TYPES


def _no_surrogates(value: str) -> str:
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise ValueError("not valid Unicode text")
    return value


NO_CONTROLS = r"^[^\x00-\x1f\x7f]*$"
Text = Annotated[str, StringConstraints(max_length=512, pattern=NO_CONTROLS),
                 AfterValidator(_no_surrogates)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_CONTROLS),
                 AfterValidator(_no_surrogates)]
Address = Annotated[str, StringConstraints(min_length=1, max_length=320, pattern=NO_CONTROLS),
                    AfterValidator(_no_surrogates)]
# PEM text (a CA's certificates): lines of printable ASCII.
Pem = Annotated[str, StringConstraints(max_length=65536, pattern=r"^[\x20-\x7e\r\n]*$")]
DomainType = Literal[DOMAIN_TYPES]  # type: ignore[valid-type]
CutoverMode = Literal[CUTOVER_MODES]  # type: ignore[valid-type]
Engine = Literal[ENGINES]  # type: ignore[valid-type]
ExportFormat = Literal[EXPORT_FORMATS]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests -----------------------------------------------------------------------------
class DomainAdd(Strict):
    """`domain add`: the same options, named like its flags."""

    name: Name
    source: Text = Field(description="old server: imap:// imap+starttls:// imaps:// pop3:// "
                                     "pop3+starttls:// pop3s://")
    relay: Text | None = Field(None, description="old SMTP server for not-yet-moved users")
    type: DomainType = "default"
    source_user: Text = Field("%u", description="%u address, %n local part, %d domain")
    subscribed_only: bool = False
    disabled: bool = Field(False, description="add with migration switched off")
    no_notice: bool = False
    no_verify_tls: bool = False
    pop3_source: Text | None = Field(
        None, description="the old server's POP3 service beside an IMAP source (`domain add "
                          "--source` given twice): pop3:// pop3+starttls:// pop3s://")
    cutover: CutoverMode | None = Field(
        None, description="passthrough (default): sessions at the old server until the copy "
                          "is complete, then one switch; immediate: at the store at once")
    engine: Engine | None = Field(None, description="copy engine (default: migration.engine)")
    source_ca: Pem | None = Field(
        None, description="PEM certificate(s) of the private CA that signed the old server's "
                          "certificate (`--source-ca`'s file content)")


class Selection(Strict):
    """The accounts of `migrate|resync|stop|start`: addresses, or a domain, or all (one)."""

    addresses: list[Address] = Field(default_factory=list, max_length=100_000)
    domain: Name | None = None
    all: bool = False
    prestage: bool = Field(False, description="migrate only: `migrate --prestage`, a copy "
                                              "through the domain's old-server admin")


class FinishRequest(Strict):
    domain: Name
    confirm: bool = Field(False, description="must be true (the CLI's confirmation, --yes)")


# -- responses ----------------------------------------------------------------------------
class Error(Open):
    error: str


class DomainOut(Open):
    name: str
    source_url: str
    migrating: bool
    relay_url: str | None
    type: str
    source_user: str
    subscribed_only: bool
    notice: bool
    verify_tls: bool


class Counters(Open):
    """The progress counters of one account, or summed over a domain."""

    folders_total: int
    folders_done: int
    messages_total: int
    messages_copied: int
    messages_skipped: int
    bytes_copied: int


class StatusRow(Counters):
    """One account, as `status --json` prints it."""

    address: str
    state: str | None
    last_error: str | None
    started_at: str | None
    finished_at: str | None
    last_pass_at: str | None
    job_state: str | None


class Totals(Counters):
    accounts: int
    states: dict[str, int]


class OutcomeOut(Open):
    address: str
    result: str
    reason: str | None


class ImportSummary(Open):
    file: str
    dry_run: bool
    created: int
    updated: int


class BadLineOut(Open):
    line: int
    column: str
    reason: str


class ImportRefusal(Error):
    bad_lines: list[BadLineOut] = Field(default_factory=list)


class FinishReport(Open):
    domain: str
    migrating: bool
    accounts: int
    migrated: list[str]
    errors: list[dict[str, Any]]
    never_migrated: list[str]
    unfinished: list[str]
    messages_copied: int
    messages_skipped: int
    bytes_copied: int
    skipped: list[dict[str, Any]]
    skipped_reasons: dict[str, int]
    no_final_pass: list[str]
    vault_entries_erased: int


class AuditEntry(Open):
    id: int
    at: str
    who: str
    via: str
    action: str
    details: dict[str, Any]
