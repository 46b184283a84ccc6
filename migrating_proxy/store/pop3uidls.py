"""POP3 continuity in the account store: the old server's UIDLs kept at an account's switch.

`keep` replaces an account's `pop3_uidls` rows by the old server's listing as the switch read
it (position, UIDL, size, and the UIDL the store gives the matched copy) and sets the status
summary (`migrations.pop3_uidls`) in the same transaction, so a POP3 login never sees half of
it. `translation` is what the login decision hands the relay for a store POP3 session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select, update

from migrating_proxy.frontends.uidl import UidlMap
from migrating_proxy.store.schema import migrations, pop3_uidls

KEPT = "kept"
NONE = "none"
_INT32_MAX = 2**31 - 1


def unmatched_summary(count: int) -> str:
    return KEPT if count == 0 else f"unmatched: {count}"


@dataclass(frozen=True)
class KeptUidl:
    position: int  # the message number at the old server when the switch read it
    uidl: str  # the old server's UIDL
    size: int  # the old server's LIST size
    store_uidl: str | None  # the UIDL of its copy on the store; None: not matched


class Pop3Uidls:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def keep(self, account_id: int, entries: Sequence[KeptUidl], summary: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(pop3_uidls).where(pop3_uidls.c.account_id == account_id))
            if entries:
                conn.execute(insert(pop3_uidls), [
                    {"account_id": account_id, "uidl": e.uidl, "size": min(e.size, _INT32_MAX),
                     "position": e.position, "store_uidl": e.store_uidl} for e in entries])
            conn.execute(update(migrations).where(migrations.c.account_id == account_id)
                         .values(pop3_uidls=summary))

    def set_summary(self, account_id: int, summary: str | None) -> None:
        """The summary alone (the dsync engine: the store itself keeps the UIDLs)."""
        with self.engine.begin() as conn:
            conn.execute(update(migrations).where(migrations.c.account_id == account_id)
                         .values(pop3_uidls=summary))

    def kept(self, account_id: int) -> list[KeptUidl]:
        """The rows `keep` wrote, in the old server's order."""
        query = (select(pop3_uidls.c.position, pop3_uidls.c.uidl, pop3_uidls.c.size,
                        pop3_uidls.c.store_uidl)
                 .where(pop3_uidls.c.account_id == account_id,
                        pop3_uidls.c.position.is_not(None))
                 .order_by(pop3_uidls.c.position))
        with self.engine.connect() as conn:
            return [KeptUidl(*row) for row in conn.execute(query)]

    def translation(self, account_id: int) -> UidlMap | None:
        """store UIDL -> old UIDL for the relay; None when nothing was kept (no translation)."""
        query = select(pop3_uidls.c.store_uidl, pop3_uidls.c.uidl).where(
            pop3_uidls.c.account_id == account_id, pop3_uidls.c.position.is_not(None))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return None
        return UidlMap({s: u for s, u in rows if s is not None}, frozenset(u for _s, u in rows))
