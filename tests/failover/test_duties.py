"""The duty table: who holds which duty, the roles that follow, and what it tells others."""

from __future__ import annotations

from exporter.config import MasterConfig
from exporter.failover.duties import DutyTable
from exporter.fleet import RoleChanged
from exporter.store import Store


def masters(*roles: str) -> list[MasterConfig]:
    return [MasterConfig(name=f"m{i}", url=f"http://127.0.0.1:{9000 + i}", role=role)
            for i, role in enumerate(roles)]


def test_a_move_persists_and_publishes_only_the_roles_that_changed(tmp_path):
    store = Store(tmp_path / "s.db")
    events: list[RoleChanged] = []
    table = DutyTable(masters("active", "active", "standby"), store, events.append)
    table.restore()
    assert events == []  # nothing stored: the configured roles stand
    table.move(["m0"], "m2", 1.0, 7)
    assert events == [RoleChanged("m0", "active", "standby"),
                      RoleChanged("m2", "standby", "active")]
    assert table.duties_of("m2") == ["m0"] and table.duties_of("m0") == []
    assert table.holder_of("m0") == "m2" and table.holder_of("m1") == "m1"
    assert table.holder_of("m2") is None  # a standby's name is no duty
    assert store.assignments()["m0"]["backup"] == "m2"
    events.clear()
    table.move(["m0"], "m0", 2.0, 8)  # failback
    assert events == [RoleChanged("m0", "standby", "active"),
                      RoleChanged("m2", "active", "standby")]
    assert store.assignments() == {}
    store.close()


def test_restart_restores_roles_from_the_store_once_subscribers_are_there(tmp_path):
    store = Store(tmp_path / "s.db")
    store.move_duties(["m0"], "m1", 1.0, 1)
    events: list[RoleChanged] = []
    table = DutyTable(masters("active", "standby"), store, events.append)
    assert table.role_of("m0") == "active" and events == []  # not yet restored
    table.restore()
    assert table.role_of("m0") == "standby" and table.role_of("m1") == "active"
    assert events == [RoleChanged("m0", "active", "standby"),
                      RoleChanged("m1", "standby", "active")]
    store.close()


def test_a_reload_that_changes_a_configured_role_publishes_it(tmp_path):
    store = Store(tmp_path / "s.db")
    events: list[RoleChanged] = []
    table = DutyTable(masters("active", "standby"), store, events.append)
    table.restore()
    table.update_config(masters("standby", "standby"))
    assert events == [RoleChanged("m0", "active", "standby")]
    assert table.duties_of("m0") == [] and table.holder_of("m0") is None
    store.close()
