from __future__ import annotations

import pytest


@pytest.fixture
def flower_task():
    """The task identity Flower's Message needs, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
