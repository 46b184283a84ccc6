"""Shared pytest fixtures. Add new fixtures in their own clearly marked block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrating_proxy.store import Store, open_store
from migrating_proxy.store.db import make_engine
from migrating_proxy.store.schema import metadata
from tests.support import dovecot
from tests.support.postgres import scratch_database
from tests.support.tls import TLSFiles, make_test_ca

# --- Dovecot fixtures (tests/support/dovecot.py) ------------------------------------------
# Instances live in their own short directory under /tmp, not in tmp_path: as root, Dovecot's
# unprivileged processes cannot traverse pytest's 0700 base directory, and its socket paths
# must stay short. The directory is removed after the test.

OLD_USERS = {"alice@old.example": "alice-pw", "bob@old.example": "bob-pw"}


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A test CA and a server certificate for localhost / 127.0.0.1."""
    return make_test_ca(tmp_path_factory.mktemp("tls"))


@contextlib.contextmanager
def running_old_server() -> Iterator[dovecot.DovecotInstance]:
    root = dovecot.instance_root("mp-old-")
    try:
        with dovecot.old_server(root, dict(OLD_USERS)) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture
def old_server() -> Iterator[dovecot.DovecotInstance]:
    """The old IMAP/POP3 server, running, with alice@ and bob@old.example (OLD_USERS)."""
    with running_old_server() as instance:
        yield instance


@pytest.fixture(scope="module")
def module_old_server() -> Iterator[dovecot.DovecotInstance]:
    """An old server shared by one test module (its tests must not stop it)."""
    with running_old_server() as instance:
        yield instance


@pytest.fixture
def new_store() -> Iterator[dovecot.DovecotInstance]:
    """The new store, running, with an empty provisioned-users file (`new_store.users_file`)."""
    root = dovecot.instance_root("mp-new-")
    try:
        provisioned = root / "provisioned" / "dovecot-users"
        with dovecot.new_store(root, provisioned) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


# --- end of Dovecot fixtures ----------------------------------------------------------------


# --- Proxy fixtures (tests/support/proxy.py) -----------------------------------------------
@pytest.fixture(scope="module")
def module_store() -> Iterator[dovecot.DovecotInstance]:
    """A new store shared by one test module, for tests that don't stop or reconfigure it."""
    root = dovecot.instance_root("mp-mod-")
    try:
        with dovecot.new_store(root, root / "provisioned" / "dovecot-users") as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture(scope="module")
def module_old() -> Iterator[dovecot.DovecotInstance]:
    """An old server shared by one test module, without users: each test adds its own
    (tests.support.mail.add_old_user)."""
    root = dovecot.instance_root("mp-mold-")
    try:
        with dovecot.old_server(root, {}) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


# --- end of proxy fixtures -----------------------------------------------------------------


# --- Database fixtures (the account store on SQLite and PostgreSQL) ------------------------
@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    with scratch_database("mp_test_") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


@pytest.fixture
def shared_database(postgres_url: str) -> Iterator[str]:
    """The session's PostgreSQL database for machines that share it (several `serve`
    processes), emptied afterwards for the next test that uses it."""
    yield postgres_url
    engine = make_engine(postgres_url)
    try:
        metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = make_engine(url)
    try:
        metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = open_store(store_url)
    yield store
    store.close()


# --- end of database fixtures --------------------------------------------------------------
