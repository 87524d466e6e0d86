"""A 304 stamps the kept checkpoint in memory; a round's stamps reach the file in one
transaction, and until then a restart sees the older (never a newer) time."""

from __future__ import annotations

from pathlib import Path

from exporter.store import Store


def test_stamps_are_read_at_once_and_written_by_the_flush(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    try:
        store.save_checkpoint("m1", 100.0, "c1", b'{"x": 1}')
        store.save_checkpoint("m2", 100.0, "c2", b'{"x": 2}')
        assert store.touch_checkpoint("m1", 150.0, "c1")
        assert store.touch_checkpoint("m2", 160.0, "c2")
        assert not store.touch_checkpoint("m1", 170.0, "other")  # not the kept one
        assert not store.touch_checkpoint("m3", 170.0, "c3")  # none kept
        assert store.checkpoint("m1") == (150.0, "c1", b'{"x": 1}')
        assert store.checkpoint_times() == {"m1": 150.0, "m2": 160.0}
        other = Store(path)  # what a restart would read before the flush
        try:
            assert other.checkpoint_times() == {"m1": 100.0, "m2": 100.0}
        finally:
            other.close()
        store.flush_stamps()
        other = Store(path)
        try:
            assert other.checkpoint_times() == {"m1": 150.0, "m2": 160.0}
            assert other.touch_checkpoint("m1", 180.0, "c1")  # learns the kept checksum
            assert other.touch_checkpoint("m1", 190.0, "c1")
        finally:
            other.close()  # flushes what it stamped
        reread = Store(path)
        try:
            assert reread.checkpoint_times()["m1"] == 190.0
        finally:
            reread.close()
    finally:
        store.close()


def test_a_new_checkpoint_replaces_a_pending_stamp(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.save_checkpoint("m1", 100.0, "c1", b"{}")
        assert store.touch_checkpoint("m1", 150.0, "c1")
        store.save_checkpoint("m1", 200.0, "c2", b'{"y": 1}')  # the state changed
        store.flush_stamps()  # the old stamp must not move the new checkpoint
        assert store.checkpoint("m1") == (200.0, "c2", b'{"y": 1}')
        assert not store.touch_checkpoint("m1", 250.0, "c1")
    finally:
        store.close()
