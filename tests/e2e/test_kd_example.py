"""examples/kd.yaml, for real: KD-FedLLM on the bundled SmolLM2, built-in non-IID tasks, offline."""

from __future__ import annotations

import json

from tests.helpers.configs import BUNDLED_MODEL, run_example

pytestmark = BUNDLED_MODEL


def test_kd_example_learns_without_sending_weights(tmp_path):
    metrics = run_example("examples/kd.yaml", tmp_path)
    run_dir = tmp_path / "kd"
    first, last = metrics[0], metrics[-1]
    assert [m["round"] for m in metrics] == list(range(6))
    # the clients' own adapters beat the base model on held-out problems of every task
    assert last["eval_loss"] < 0.75 * first["eval_loss"]
    assert last["eval_accuracy"] > first["eval_accuracy"]
    # kilobytes per client per round, both ways; a fp32 LoRA update of this model is 3.69 MB
    for m in metrics[1:]:
        assert m["bytes_up"] / len(m["clients"]) < 20_000 and m["bytes_down"] / len(m["clients"]) < 20_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["paradigm"] == "kd" and summary["public_examples"] == 400
    assert sorted(p.name for p in (run_dir / "final_adapter").iterdir()) == [f"client-{c}" for c in range(4)]
