"""Fixtures for the codec tests."""

from __future__ import annotations

import pytest

from fedtune.core.types import Params
from tests.codecs.helpers import adapter_update


@pytest.fixture
def update() -> Params:
    return adapter_update()
