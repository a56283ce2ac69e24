"""`fedtune data --export`: each client's share as its own file, read back exactly."""

from __future__ import annotations

from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.config import load_config
from fedtune.data.formats import load_examples
from fedtune.data.prepare import prepare_federated_data


def test_exported_client_files_read_back_as_the_partition(tmp_path):
    args = ["partition.method=dirichlet", "partition.field=task", "partition.num_clients=3"]
    result = CliRunner().invoke(app, ["data", "examples/tiny.yaml", *args, "--export", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cfg = load_config("examples/tiny.yaml", args)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-0.jsonl", "client-1.jsonl", "client-2.jsonl"]
    for cid, part in enumerate(data.parts):
        back = load_examples(tmp_path / f"client-{cid}.jsonl")
        expected = [data.train[i] for i in part]
        assert back == expected  # messages, in partition order
        assert [e.meta for e in back] == [e.meta for e in expected]  # and the fields partitioning uses
