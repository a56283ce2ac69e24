"""What fedtune relies on inside Flower, beyond its public API: each part named, checked against the installed flwr.

A Flower upgrade that moves any of them fails here, naming the part, before a deployment meets it.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("flwr")

from fedtune.deploy import fleet
from fedtune.runtime import flower_grid

REPO = Path(__file__).resolve().parents[2]


def _range(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    low, high = re.fullmatch(r">=([\d.]+),<([\d.]+)", spec).groups()  # type: ignore[union-attr]
    return tuple(map(int, low.split("."))), tuple(map(int, high.split(".")))


def test_the_installed_flower_is_the_range_the_link_was_checked_against_and_pyproject_allows():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r for r in extras["flower"] if r.startswith("flwr")] == [f"flwr{fleet.TESTED_FLWR}"]
    low, high = _range(fleet.TESTED_FLWR)
    installed = tuple(int(x) for x in version("flwr").split(".")[:3])
    assert low <= installed < high, f"flwr {version('flwr')} is outside {fleet.TESTED_FLWR}: recheck FLOWER_PARTS"


def test_every_flower_part_the_client_link_uses_is_where_it_was():
    assert fleet.moved_flower_parts() == [], "moved in this Flower: " + ", ".join(fleet.moved_flower_parts())


def test_a_moved_part_is_named_when_the_link_starts(monkeypatch):
    monkeypatch.setitem(fleet.FLOWER_PARTS, "flwr.supernode.fleet_http_client", ("FleetHttpClient", "GoneClient"))
    monkeypatch.setitem(fleet.FLOWER_PARTS, "flwr.no_such_module", ("x",))
    with pytest.raises(
        ImportError, match=r"lacks flwr\.supernode\.fleet_http_client\.GoneClient, flwr\.no_such_module"
    ):
        fleet.FleetLink("127.0.0.1:1", None, None)


def test_object_pulls_take_the_waits_fedtune_gives_them():
    """Both ends shorten Flower's wait for a message's late content (1 s, 2 s, ...): the client through
    pull_and_inflate_object_from_tree's arguments, the coordinator by binding them into HttpGrid's pull_objects."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    for fn in (inflatable_utils.pull_and_inflate_object_from_tree, inflatable_utils.pull_objects):
        params = inspect.signature(fn).parameters
        assert {"initial_backoff", "backoff_cap"} <= set(params), f"{fn.__name__} lost its backoff arguments"
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages), "HttpGrid pulls another way now"
    assert flower_grid.quicken_object_pulls()
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.002, "backoff_cap": 0.1}
    assert flower_grid.quicken_object_pulls() and http_grid.pull_objects.func is inflatable_utils.pull_objects


def test_the_superlink_keeps_its_state_in_memory_under_the_name_fedtune_passes():
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from fedtune.deploy.processes import IN_MEMORY

    assert str(IN_MEMORY) == FLWR_IN_MEMORY_DB_NAME
