"""The checksum's known-answer test vector (docs/protocol.md, "Known-answer test vector").

The canonical text and both checksums were written and computed once by hand, with
``printf '%s' '<canonical text>' | sha256sum``, not with the code under test; they pin the
exporter's client and the simulated master to the same published rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from exporter.failover import protocol
from exporter.sim import state as sim_state

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

VECTOR: dict[str, Any] = {
    "master": "vector-a",
    "region": "uae",
    "sessions": {"s1": {"phone": "+971500000001", "opened_at": 1735689600, "messages": 2,
                        "name": "Zoë 😀"}},
    "pending_messages": [{"id": "m1", "text": 'hi "there"\n'}],
    "config": {"vip": True, "rate": 0.5, "note": None, "language": "en"},
}
CANONICAL = (
    r'{"config":{"language":"en","note":null,"rate":0.5,"vip":true},"master":"vector-a",'
    r'"pending_messages":[{"id":"m1","text":"hi \"there\"\n"}],"region":"uae",'
    r'"sessions":{"s1":{"messages":2,"name":"Zo\u00eb \ud83d\ude00","opened_at":1735689600,'
    r'"phone":"+971500000001"}}}'
)
OWN = "8a2d4aa54ab2f8b2f0b85d1f463d137e8d99da4bbd68fd1e31e24a0036a69236"
STORED = "2546cc4b7ed97427a23287fb4ff22b5e9207b25492423f7efd128310e580c41d"


def _sent() -> bytes:
    """The vector as a master might send it: checksum first, indented, raw UTF-8."""
    return json.dumps({"checksum": OWN, **VECTOR}, indent=2, ensure_ascii=False).encode()


def test_the_published_canonical_text_hashes_to_the_published_checksum():
    assert len(CANONICAL) == 265 and CANONICAL.isascii()
    assert hashlib.sha256(CANONICAL.encode()).hexdigest() == OWN


@pytest.mark.parametrize("checksum", [protocol.snapshot_checksum, sim_state.snapshot_checksum],
                         ids=["exporter", "simulated-master"])
def test_both_implementations_give_the_known_answer(checksum):
    assert checksum(VECTOR) == OWN
    assert checksum({**VECTOR, "checksum": "ignored: never part of its own hash"}) == OWN
    stored = {k: VECTOR[k] for k in ("sessions", "pending_messages", "config")}
    assert checksum(stored) == STORED


def test_the_exporter_verifies_the_vector_and_accepts_both_import_checksums():
    snap = protocol.parse_snapshot(_sent())
    assert snap.checksum == OWN and snap.master == "vector-a"
    assert snap.import_checksums == frozenset({OWN, STORED})
    assert (snap.sessions, snap.pending_messages) == (1, 1)
    tampered = _sent().replace(b"+971500000001", b"+971500000002")
    with pytest.raises(protocol.MasterCallError, match="checksum mismatch"):
        protocol.parse_snapshot(tampered)


def test_the_simulated_master_verifies_and_imports_the_vector():
    assert sim_state.SimulatedMaster.verify_snapshot(json.loads(_sent())) == OWN
    backup = sim_state.SimulatedMaster("b", role="standby")
    assert backup.import_snapshot(json.loads(_sent())) == OWN
    with pytest.raises(ValueError, match="checksum does not match"):
        sim_state.SimulatedMaster.verify_snapshot({**json.loads(_sent()), "region": "usa"})


def test_the_spec_publishes_exactly_this_vector():
    text = DOC.read_text(encoding="utf-8")
    assert CANONICAL in text and OWN in text and STORED in text
    assert "265 bytes" in text
