"""Pre-stage (issue 13): every mailbox copied before its user logs in, through the old server's
admin credentials; a real Dovecot old server with a master user, the proxy's CLI, workers and
`serve`.

The old server's administrator (a Dovecot master user) logs in as any user with SASL PLAIN's
authzid or as `user*admin`. Users imported without passwords are pre-staged in the background;
their first login proves the password at the old server as always, then a final pass and (in
passthrough mode) the switch follow at once.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from migrating_proxy.admin.operations import NO_ADMIN
from migrating_proxy.migration.connections import (
    SEPARATOR,
    SourceAdmin,
    SourceAuthError,
    SourceSpec,
    check_source_login,
)
from tests.support import dovecot
from tests.support.cutover import (
    MOVED,
    MOVING,
    User,
    count,
    events,
    message,
    passthrough_proxy,
    pool,
    stop,
    vault_entries,
    without,
)
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy, wait_for
from tests.support.secrets import b64, secret_forms

ADMIN, ADMIN_PW = "mailadmin", "Adm1n-Geheimnis-€"


@pytest.fixture(scope="module")
def old() -> Iterator[DovecotInstance]:
    """The old server of this module, with the administrator ADMIN (a Dovecot master user)."""
    root = dovecot.instance_root("mp-pre-")
    try:
        with dovecot.old_server(root, {}, masters={ADMIN: ADMIN_PW}) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture
def store(module_store: DovecotInstance) -> DovecotInstance:
    return module_store


def admin_file(directory: Path, password: str = ADMIN_PW) -> Path:
    path = directory / "admin-password"
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def with_admin(proxy: Proxy, directory: Path, *extra: str, password: str = ADMIN_PW,
               check: bool = True) -> object:
    return proxy.cli("domain", "set", "old.example", "--source-admin", ADMIN,
                     "--source-admin-password-file", str(admin_file(directory, password)),
                     *extra, check=check)


def domain_row(proxy: Proxy) -> dict[str, object]:
    [row] = json.loads(proxy.cli("domain", "list", "--json").stdout)
    return row


def domain_secrets(proxy: Proxy) -> list[bytes]:
    with sqlite3.connect(proxy.directory / "proxy.db") as conn:
        return [row[0] for row in conn.execute("SELECT ciphertext FROM domain_vault")]


# --- (1) the admin credentials ---------------------------------------------------------------


def test_admin_credentials_are_checked_then_kept_encrypted(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    with_admin(proxy, tmp_path)
    row = domain_row(proxy)
    assert (row["source_admin"], row["source_admin_style"]) == (ADMIN, None)
    [secret] = domain_secrets(proxy)
    assert ADMIN_PW.encode() not in secret
    # Another style is checked again with the kept password.
    with_style = proxy.cli("domain", "set", "old.example", "--source-admin-style", "separator")
    assert with_style.returncode == 0
    assert domain_row(proxy)["source_admin_style"] == "separator"
    # '' forgets the admin and its secret.
    proxy.cli("domain", "set", "old.example", "--source-admin", "")
    assert domain_row(proxy)["source_admin"] is None and domain_secrets(proxy) == []


@pytest.mark.parametrize("command", ["add", "set"])
def test_wrong_admin_credentials_are_refused_in_one_line_and_nothing_is_saved(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path, command: str) -> None:
    proxy = passthrough_proxy(tmp_path / "proxy", old, store, add_domain=command == "set")
    wrong = admin_file(tmp_path, "not-the-admin-password")
    source = ["--source", f"imap://127.0.0.1:{old.imap_port}"] if command == "add" else []
    result = proxy.cli("domain", command, "old.example", *source, "--source-admin", ADMIN,
                       "--source-admin-password-file", str(wrong), check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("migrating-proxy: error: the old server 127.0.0.1 refused the "
                           f"admin credentials of {ADMIN}")
    assert "not-the-admin-password" not in result.stderr
    rows = json.loads(proxy.cli("domain", "list", "--json").stdout)
    assert rows == [] if command == "add" else rows[0]["source_admin"] is None
    assert domain_secrets(proxy) == []


def test_admin_options_that_make_no_sense_are_refused(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    cases = [
        (["--source-admin-password-file", str(admin_file(tmp_path))],
         "--source-admin-password-file needs --source-admin USER"),
        (["--source-admin", ADMIN], "--source-admin needs --source-admin-password-file FILE"),
        (["--source-admin", ADMIN, "--source-admin-password-file", str(tmp_path / "nope")],
         "cannot read"),
        (["--source-admin", ADMIN, "--source-admin-password-file",
          str(admin_file(tmp_path)), "--source-admin-separator", "a b"],
         "--source-admin-separator must be"),
    ]
    for options, wanted in cases:
        result = proxy.cli("domain", "set", "old.example", *options, check=False)
        assert result.returncode == 1 and wanted in result.stderr, (options, result.stderr)
    assert domain_row(proxy)["source_admin"] is None and domain_secrets(proxy) == []


def admin_alias(old: DovecotInstance, address: str) -> None:
    """What a server that expects `user*admin` has: that login name, the admin's password,
    logging in as the user (Dovecot's passdb `user` field); and no SASL authzid for it."""
    with old.users_file.open("a", encoding="utf-8") as users:
        users.write(f"{address}*{ADMIN}:{{PLAIN}}{ADMIN_PW}::::::user={address}\n")


def separator_login_works(old: DovecotInstance, address: str) -> bool:
    spec = SourceSpec("imap", "127.0.0.1", old.imap_port, "none", False, address, "",
                      admin=SourceAdmin(ADMIN, ADMIN_PW, SEPARATOR))
    try:
        check_source_login(spec, 5)
    except SourceAuthError:
        return False
    return True


@pytest.fixture(scope="module")
def separator_old() -> Iterator[DovecotInstance]:
    """An old server that knows its administrator only as `user*ADMIN` login names."""
    root = dovecot.instance_root("mp-sep-")
    try:
        instance = dovecot.old_server(root, {})
        with instance.config_path.open("a") as config:
            config.write("auth_username_chars =\n")  # Dovecot refuses "*" in names otherwise
        with instance:
            admin_alias(instance, "postmaster@old.example")
            yield instance
    finally:
        dovecot.remove_root(root)


def test_separator_style_against_a_server_that_expects_user_star_admin(
        separator_old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    proxy = passthrough_proxy(tmp_path / "proxy", separator_old, store)
    refused = with_admin(proxy, tmp_path, check=False)
    assert refused.returncode == 1  # authzid: this server has no such admin
    with_admin(proxy, tmp_path, "--source-admin-style", "separator",
               "--source-admin-separator", "*")
    assert domain_row(proxy)["source_admin_style"] == "separator"
    # And the copy logs in the same way: pre-staged through `user*mailadmin`.
    user = User(separator_old, store)
    admin_alias(separator_old, user.address)
    wait_for(lambda: separator_login_works(separator_old, user.address),
             "the old server to read its user file")
    import_addresses(proxy, user)
    assert [o["result"] for o in prestage(proxy, user.address)] == ["queued"]
    [row] = work_until_prestaged(proxy, user.address)
    assert row["prestaged_at"] is not None and row["last_error"] is None, row
    assert user.store_snapshot() == user.old_snapshot()


# --- (2) and (3): accounts without passwords, pre-staged in the background ----------------


def prestage_proxy(directory: Path, old: DovecotInstance, store: DovecotInstance,
                   *extra: str, workers: int = 0,
                   overrides: dict[str, dict[str, object]] | None = None) -> Proxy:
    proxy = passthrough_proxy(directory / "proxy", old, store, workers=workers,
                              overrides=overrides)
    with_admin(proxy, directory, *extra)
    return proxy


def import_addresses(proxy: Proxy, *users: User) -> None:
    listing = proxy.directory / f"users-{len(users)}-{users[0].address}.csv"
    listing.write_text("".join(f"{user.address}\n" for user in users))
    proxy.cli("import", str(listing))


def prestage(proxy: Proxy, *args: str) -> list[dict[str, object]]:
    return json.loads(proxy.cli("migrate", *args, "--prestage", "--json", check=False).stdout)


def work_until_prestaged(proxy: Proxy, *addresses: str, timeout: float = 90
                         ) -> list[dict[str, object]]:
    """Run `migrating-proxy worker` until every account's pass is over; the status rows."""
    workers = pool(proxy)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = proxy.status(*addresses)
            if all(row["job_state"] is None for row in rows):
                return rows
            assert time.monotonic() < deadline, (rows, proxy.log_text()[-3000:])
            time.sleep(0.3)
    finally:
        stop(workers)


def test_imported_addresses_are_pre_staged_and_kept_current_until_their_users_log_in(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    users = [User(old, store), User(old, store)]
    proxy = prestage_proxy(tmp_path, old, store)
    import_addresses(proxy, *users)
    addresses = [user.address for user in users]
    rows = proxy.status(*addresses)
    assert [(r["state"], r["password_known"], r["prestaged_at"], r["served_by"])
            for r in rows] == [("NEW", False, None, "old")] * 2
    assert [o["result"] for o in prestage(proxy, "--domain", "old.example")] == ["queued"] * 2
    assert {r["job_state"] for r in proxy.status(*addresses)} == {"queued"}

    rows = work_until_prestaged(proxy, *addresses)
    for row in rows:  # waiting for its user: PENDING, no job, still on the old server
        assert (row["state"], row["job_state"], row["served_by"], row["password_known"]) == (
            "PENDING", None, "old", False), row
        assert row["prestaged_at"] is not None and row["switched_at"] is None
    for user in users:  # every folder, message, flag and date; no notice before the login
        assert user.store_snapshot() == user.old_snapshot()

    users[0].change_something("after the pre-stage pass")
    assert [o["result"] for o in json.loads(proxy.cli(
        "resync", "--domain", "old.example", "--json").stdout)] == ["queued"] * 2
    work_until_prestaged(proxy, *addresses)
    assert users[0].store_snapshot() == users[0].old_snapshot()  # kept current (mirrored)
    assert vault_entries(proxy) == 0  # no user's password was ever needed
    assert ADMIN_PW not in proxy.log_text()


def test_pre_stage_refuses_what_it_cannot_do(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    known = User(old, store)
    proxy = prestage_proxy(tmp_path, old, store)
    ghost = f"ghost-{known.address}"  # imported, but the old server has no such user
    listing = tmp_path / "users.csv"
    listing.write_text(f"{known.address}\n{ghost}\n")
    proxy.cli("import", str(listing))
    # A plain migrate needs the users' passwords, which nobody gave.
    assert {o["result"] for o in json.loads(proxy.cli(
        "migrate", known.address, "--json").stdout)} == {"skipped"}
    outcomes = {o["address"]: o for o in prestage(proxy, known.address, ghost)}
    assert outcomes[known.address]["result"] == "queued"
    assert outcomes[ghost]["result"] == "error"
    assert "refused the admin's login as" in outcomes[ghost]["reason"]
    [row] = proxy.status(ghost)
    assert row["state"] == "ERROR" and row["job_state"] is None
    # stop and start work on pre-stage passes as on any other.
    assert json.loads(proxy.cli("stop", known.address, "--json").stdout)[0]["result"] == \
        "paused"
    assert proxy.status(known.address)[0]["job_state"] == "paused"
    assert json.loads(proxy.cli("start", known.address, "--json").stdout)[0]["result"] == \
        "resumed"
    assert proxy.status(known.address)[0]["job_state"] == "queued"
    # Without admin credentials there is no pre-stage.
    proxy.cli("domain", "set", "old.example", "--source-admin", "")
    proxy.cli("stop", known.address)
    [outcome] = prestage(proxy, ghost)
    assert (outcome["result"], outcome["reason"]) == ("skipped", NO_ADMIN)


# --- (4) the first login of a pre-staged account ---------------------------------------------


def login(proxy: Proxy, user: User, password: str | None = None) -> IMAPClient:
    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30)
    client.login(user.address, password or user.password)
    return client


def prestaged_users(proxy: Proxy, *users: User) -> None:
    import_addresses(proxy, *users)
    assert {o["result"] for o in prestage(proxy, *(u.address for u in users))} == {"queued"}
    work_until_prestaged(proxy, *(u.address for u in users))


def test_first_login_of_a_pre_staged_account_switches_it_at_once(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user, other = User(old, store), User(old, store)
    proxy = prestage_proxy(tmp_path, old, store, workers=1)
    prestaged_users(proxy, user, other)
    user.change_something("after the pre-stage pass")  # to be caught by the final pass
    with proxy:
        with pytest.raises(IMAPClient.Error):  # a wrong password: refused, nothing moves
            login(proxy, user, "not-" + user.password)
        [row] = proxy.status(user.address)
        assert (row["state"], row["served_by"], row["job_state"], row["password_known"]) == (
            "PENDING", "old", None, False)

        with login(proxy, user) as client:  # held until the switch, then the store
            [row] = proxy.status(user.address)
            assert row["served_by"] == "store" and row["switched_at"] is not None, row
            assert row["password_known"] is True
            client.select_folder("INBOX", readonly=True)
            assert client.search(["SUBJECT", "after the pre-stage pass"])
        row = proxy.wait_for_state(user.address)
        assert (row["state"], row["job_state"]) == ("COMPLETED", None), row
    moved = user.store_snapshot()
    assert without(moved, MOVED) == user.old_snapshot()  # exact, mail since included
    assert count(moved, MOVED) == 1 and count(moved, MOVING) == 0
    [done] = events(proxy, "switch_done")
    assert 0 < done["hold_seconds"] < 10
    [served] = [e for e in events(proxy, "login") if e.get("address") == user.address
                and e.get("outcome") == "ok"]
    assert served["served_by"] == "store"
    [untouched] = proxy.status(other.address)  # the other user has not logged in yet
    assert (untouched["state"], untouched["served_by"]) == ("PENDING", "old")
    assert user.password not in proxy.log_text() and ADMIN_PW not in proxy.log_text()

    # (5) finish: the never-logged-in account gets its final pass (through the admin, ending
    # in its switch) and is reported on its own; export marks it for a password.
    other.change_something("before finish")
    workers = pool(proxy)
    try:
        report = json.loads(proxy.cli("finish", "old.example", "--yes", "--json").stdout)
    finally:
        stop(workers)
    assert report["migrated"] == [user.address]
    assert report["prestaged_never_logged_in"] == [other.address]
    assert report["never_migrated"] == [] and report["unfinished"] == []
    assert report["switched_without_final_pass"] == [] and report["admin_password_erased"]
    [row] = proxy.status(other.address)
    assert (row["served_by"], row["state"], row["password_known"]) == (
        "store", "COMPLETED", False)
    assert without(other.store_snapshot(), MOVED) == other.old_snapshot()
    exported = proxy.cli("export", "old.example", "--format", "csv").stdout.splitlines()
    assert f"{other.address},,COMPLETED,false" in exported
    assert any(line.startswith(f"{user.address},$6$") and line.endswith(",COMPLETED,true")
               for line in exported)
    assert domain_secrets(proxy) == []


def test_first_login_of_a_pre_staged_account_in_immediate_mode_copies_only_what_changed(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    proxy = prestage_proxy(tmp_path, old, store, workers=1)
    proxy.cli("domain", "set", "old.example", "--cutover", "immediate")
    prestaged_users(proxy, user)
    [before] = proxy.status(user.address)
    assert before["served_by"] == "store" and before["state"] == "PENDING"
    copied_before = before["messages_copied"]
    with user.at_old() as client:  # the store is the user's from the login: only new mail
        client.append("INBOX", message("after the pre-stage pass").raw)
    with proxy:
        with login(proxy, user) as client:  # served by the store at once
            client.select_folder("INBOX", readonly=True)
        row = proxy.wait_for_state(user.address)
    assert (row["state"], row["password_known"]) == ("COMPLETED", True)
    assert without(user.store_snapshot(), MOVING) == user.old_snapshot()
    assert count(user.store_snapshot(), MOVING) == 1
    assert row["messages_copied"] - copied_before == 1  # only the new message


# --- secrets -----------------------------------------------------------------------------------


def admin_secret_forms(addresses: list[str]) -> list[bytes]:
    """The admin password as it travels: itself, JSON-escaped, and in SASL PLAIN blobs with
    each user as authorization identity (the pre-stage logins)."""
    forms = [*secret_forms(ADMIN_PW, [ADMIN]), json.dumps(ADMIN_PW)[1:-1]]
    forms += [b64(f"{address}\0{ADMIN}\0{ADMIN_PW}") for address in addresses]
    return [form.encode() for form in forms]


def process_command_lines() -> bytes:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(cmdline.read_bytes())
    return b"\n".join(lines)


def test_the_admin_password_is_in_no_log_database_process_list_or_file(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store, workers=1)
    given = tmp_path / "operator" / "admin-password"  # the one file allowed to hold it
    given.parent.mkdir()
    assert with_admin(proxy, tmp_path / "operator", password="wrong-" + ADMIN_PW,
                      check=False).returncode == 1
    with_admin(proxy, tmp_path / "operator")
    import_addresses(proxy, user)
    prestage(proxy, user.address)
    command_lines = []
    with proxy:  # serve and its worker pre-stage the account, then the user logs in
        command_lines.append(process_command_lines())
        wait_for(lambda: proxy.status(user.address)[0]["prestaged_at"] is not None,
                 "the pre-stage pass")
        command_lines.append(process_command_lines())
        login(proxy, user).logout()
        proxy.wait_for_state(user.address)
    files = {str(p): p.read_bytes() for p in proxy.directory.rglob("*") if p.is_file()}
    files |= {"process list": b"\n".join(command_lines),
              str(store.users_file): store.provisioned_text().encode(),
              str(store.log_path): store.log_path.read_bytes()}
    assert any(name.endswith("proxy.db") for name in files)
    assert b"domain_vault" in files[str(proxy.directory / "proxy.db")]
    forms = admin_secret_forms([user.address])
    leaks = {name: [f for f in forms if f in data] for name, data in files.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    assert given.read_text().strip() == ADMIN_PW  # the operator's own file, untouched


# --- pre-stage passes give way ----------------------------------------------------------------


def test_a_paced_pre_stage_pass_yields_to_a_login_s_pass_then_finishes(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    """One worker, a pre-stage pass slowed by prestage_rate (the sample mailbox's 200 kB
    message takes seconds): a user's pass queued meanwhile runs first, the pre-stage pass
    goes back to the queue and completes afterwards, copying nothing twice."""
    early, urgent = User(old, store), User(old, store)
    proxy = prestage_proxy(tmp_path, old, store,
                           overrides={"migration": {"prestage_rate": 15_000}})
    import_addresses(proxy, early)
    prestage(proxy, early.address)
    workers = pool(proxy)
    try:
        wait_for(lambda: proxy.status(early.address)[0]["job_state"] == "running",
                 "the pre-stage pass to start", timeout=30)
        with_password = tmp_path / "urgent.csv"
        with_password.write_text(f"{urgent.address},{urgent.password}\n")
        proxy.cli("import", str(with_password))
        proxy.cli("migrate", urgent.address)
        assert proxy.wait_for_state(urgent.address, ("COMPLETED",))["served_by"] == "store"
        wait_for(lambda: proxy.status(early.address)[0]["prestaged_at"] is not None,
                 "the pre-stage pass to finish", timeout=60)
    finally:
        stop(workers)
    ended = [e for e in events(proxy, "migration_pass_ended")]
    assert [e["address"] for e in ended] == [urgent.address, early.address]
    assert events(proxy, "prestage_yielded")
    assert early.store_snapshot() == early.old_snapshot()
    [row] = proxy.status(early.address)
    assert row["messages_copied"] == sum(len(v) for v in early.old_snapshot().values())
