"""Shared fixtures."""

from __future__ import annotations

import pytest

from tests.support import free_port


@pytest.fixture
def port() -> int:
    return free_port()
