"""Who holds which duty: the one owner of duty assignments and of every master's role.

A *duty* is named after the master configured active for it. It is held by that master unless
an assignment (written by a failover) says another master holds it. A master's role is derived:
``active`` when it holds at least one duty, ``standby`` otherwise. Nobody else stores either
fact; routing learns role changes from the ``RoleChanged`` events published here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from exporter.config import MasterConfig
from exporter.fleet.events import RoleChanged
from exporter.store import Store

ACTIVE, STANDBY = "active", "standby"


class DutyTable:
    """Assignments persisted in the store, roles derived from them and the configuration."""

    def __init__(
        self,
        masters: Sequence[MasterConfig],
        store: Store,
        publish: Callable[[RoleChanged], None],
    ) -> None:
        self._store = store
        self._publish = publish
        self._configured: dict[str, str] = {m.name: m.role for m in masters}
        self._held: dict[str, str] = {d: a["backup"] for d, a in store.assignments().items()}
        self._roles: dict[str, str] = dict(self._configured)

    # --- reading --------------------------------------------------------------------------
    def role_of(self, name: str) -> str:
        return self._roles.get(name, STANDBY)

    def configured_role(self, name: str) -> str:
        return self._configured.get(name, STANDBY)

    def holder_of(self, duty: str) -> str | None:
        if duty in self._held:
            return self._held[duty]
        return duty if self._configured.get(duty) == ACTIVE else None

    def duties_of(self, name: str) -> list[str]:
        """Its own duty (configured active and not taken away) plus those assigned to it."""
        own = [name] if self._configured.get(name) == ACTIVE and name not in self._held else []
        return own + sorted(d for d, holder in self._held.items() if holder == name)

    def assigned_away(self, duty: str) -> str | None:
        """The master holding ``duty`` in place of its owner, if any."""
        return self._held.get(duty)

    def assignments(self) -> dict[str, str]:
        return dict(self._held)

    # --- changing ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Publish the roles the stored assignments give, once every consumer is subscribed."""
        self._derive()

    def reload(self) -> None:
        """Re-read the assignments after the store was changed under the table (a cluster
        member taking the leader's facts); changed roles are published."""
        self._held = {d: a["backup"] for d, a in self._store.assignments().items()}
        self._derive()

    def update_config(self, masters: Sequence[MasterConfig]) -> None:
        self._configured = {m.name: m.role for m in masters}
        self._derive()

    def move(self, duties: Iterable[str], holder: str, since: float, move_id: int) -> None:
        """``holder`` now holds ``duties`` (persisted first, or kept in the store's memory while
        its file fails; then roles re-derived)."""
        duties = list(duties)
        self._store.move_duties(duties, holder, since, move_id)
        for duty in duties:
            if duty == holder:
                self._held.pop(duty, None)
            else:
                self._held[duty] = holder
        self._derive()

    def _derive(self) -> None:
        holders = set(self._held.values())
        roles: dict[str, str] = {}
        for name, configured in self._configured.items():
            own = configured == ACTIVE and name not in self._held
            roles[name] = ACTIVE if own or name in holders else STANDBY
        old = self._roles
        self._roles = roles
        for name, role in roles.items():
            before = old.get(name, self._configured[name])
            if before != role:
                self._publish(RoleChanged(name, before, role))

