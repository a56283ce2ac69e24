"""evaluation.tasks through the real CLI: every kind on generated sets of the public schemas."""

from __future__ import annotations

import json

from fedtune.data.builtin.shaped import records
from tests.helpers.cli import cli, read_metrics, run_tiny


def _write(tmp_path, name, n):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(name, n)))
    return path


def test_every_kind_is_scored_at_the_start_and_the_end_and_summarised(tmp_path):
    sets = {name: _write(tmp_path, name, 6) for name in ("mmlu", "fpb", "gsm8k", "dolly", "mbpp")}
    tasks = [
        {"kind": "multiple_choice", "dataset": str(sets["mmlu"]), "recipe": "mmlu", "shots": 1},
        {
            "kind": "multiple_choice",
            "dataset": str(sets["mmlu"]),
            "recipe": "mmlu",
            "method": "option",
            "name": "mmlu_options",
        },
        {"kind": "label_choice", "dataset": str(sets["fpb"]), "recipe": "fpb"},
        {"kind": "answer_extraction", "dataset": str(sets["gsm8k"]), "recipe": "gsm8k", "max_new_tokens": 6},
        {"kind": "rouge_l", "dataset": str(sets["dolly"]), "recipe": "dolly", "max_new_tokens": 6, "every_round": True},
        {"kind": "pass_at_k", "dataset": str(sets["mbpp"]), "recipe": "mbpp", "max_new_tokens": 6, "max_samples": 2},
    ]
    code, out = run_tiny(tmp_path, "federation.rounds=2", f"evaluation.tasks={json.dumps(tasks)}")
    assert code == 0, out
    metrics = read_metrics(tmp_path / "tiny")
    scores = [
        "mmlu_accuracy",
        "mmlu_options_accuracy",
        "fpb_accuracy",
        "fpb_macro_f1",
        "gsm8k_accuracy",
        "dolly_rouge_l",
        "mbpp_pass_at_1",
    ]
    for m in (metrics[0], metrics[-1]):
        assert all(0 <= m[k] <= 1 for k in scores), {k: m.get(k) for k in scores}
        assert set(m["mmlu_accuracy_by_group"]) == {
            "elementary_mathematics",
            "high_school_statistics",
            "computer_science",
        }
    assert "mmlu_accuracy" not in metrics[1] and "dolly_rouge_l" in metrics[1]  # every_round: every evaluation
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert all(k in summary["initial"] and k in summary["final"] for k in scores)
    code, out = cli("report", str(tmp_path / "tiny"), "--plot")
    assert code == 0 and "mmlu_accuracy" in out and "curves.png" in out, out
    png = (tmp_path / "tiny" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_export_writes_a_merged_model_plain_transformers_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from fedtune.adapters.adapter_model import load_adapter
    from fedtune.models.loading import load_model

    code, out = run_tiny(tmp_path, "federation.rounds=1")
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    code, out = cli("export", str(run_dir), "--gguf")
    assert code == 0 and "model.gguf" in out, out
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        expected = load_adapter(load_model("tiny-llama").model, run_dir / "final_adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()(input_ids=ids).logits
        gguf = AutoModelForCausalLM.from_pretrained(run_dir / "merged", gguf_file="model.gguf").eval()
        assert torch.allclose(merged, expected, atol=1e-5) and torch.allclose(
            gguf(input_ids=ids).logits, expected, atol=1e-5
        )
    code, out = cli("export", str(tmp_path / "missing"))
    assert code != 0 and "config.yaml does not exist" in out
