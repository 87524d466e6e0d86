"""A real small filesystem for the tests of a failing state store: a tmpfs mounted for the test,
filled to the last byte, and freed again.

Mounting needs root (or CAP_SYS_ADMIN). Where it is refused the test fails under CI=true (CI
must never pass by skipping it) and is skipped elsewhere, the rule of ``require_binary`` in
tests/tools.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tools import in_ci


class Tmpfs:
    """tmpfs mounts under ``root``; ``unmount_all`` ends them (lazily if still in use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []

    def mount(self, name: str = "disk", size: str = "2m", readonly: bool = False) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if readonly else "")
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                  capture_output=True, text=True, timeout=30)
            why = proc.stderr.strip() or f"exit {proc.returncode}"
            ok = proc.returncode == 0
        except OSError as exc:
            why, ok = str(exc), False
        if not ok:
            message = f"cannot mount a tmpfs at {path} ({why}); it needs root or CAP_SYS_ADMIN"
            if in_ci():
                pytest.fail(f"{message}: required when CI=true", pytrace=False)
            pytest.skip(f"{message} (under CI=true this fails instead)")
        self.mounts.append(path)
        return path

    def unmount_all(self) -> None:
        for path in reversed(self.mounts):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=True)
        self.mounts.clear()


@contextmanager
def tmpfs_under(root: Path) -> Iterator[Tmpfs]:
    mounts = Tmpfs(root)
    try:
        yield mounts
    finally:
        mounts.unmount_all()


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; the filler file to delete."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler
