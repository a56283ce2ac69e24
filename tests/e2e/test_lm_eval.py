"""``fedtune lm-eval``: a run's final model scored by lm-evaluation-harness on local task files, offline."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.cli import cli, run_tiny
from tests.helpers.lm_eval_tasks import write_mc_task

pytest.importorskip("lm_eval")

DOCS = [
    {"question": f"What is {a} plus {b}?", "choices": [str(a + b + s) for s in (-i % 3, (1 - i) % 3, (2 - i) % 3)],
     "label": i % 3, "answer": str(a + b)}
    for i, (a, b) in enumerate((a, b) for a in range(2, 9) for b in (3, 11, 47))
]  # fmt: skip
GEN = """task: fed_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def _accuracy(model, tok) -> float:
    """lm-eval's multiple-choice acc by hand: argmax over choices of log p(" " + choice | context), the pair
    tokenised as lm-eval does (the whole string, the context's tokens split off)."""
    hits = []
    for doc in DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            n = len(tok(context, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)  # (T-1, V)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(n, len(whole))))
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_lm_eval_scores_the_final_model_and_the_base_on_local_tasks(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from fedtune.adapters.adapter_model import load_adapter
    from fedtune.models.loading import load_model

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    code, out = run_tiny(tmp_path, "federation.rounds=1")
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    weights = run_dir / "final_adapter" / "adapter_model.safetensors"
    trained = load_file(weights)  # one round moves the tiny model too little to tell apart from its base
    save_file({k: v * 300 if "lora_B" in k else v for k, v in trained.items()}, weights)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks, "fed_mc", data, "label")
    (tasks / "fed_gen.yaml").write_text(GEN.format(data=data))
    code, out = cli("lm-eval", str(run_dir), "--tasks", "fed_mc,fed_gen", "--include-path", str(tasks), "--base")
    assert code == 0, out
    report = json.loads((run_dir / "lm_eval.json").read_text())
    assert set(report["scores"]) == {"base", "final"} and "fed_mc" in out and "acc,none" in out
    tiny = load_model("tiny-llama")
    final = load_adapter(load_model("tiny-llama").model, run_dir / "final_adapter").eval()
    by_hand = {"final": _accuracy(final, tiny.tokenizer), "base": _accuracy(tiny.model.eval(), tiny.tokenizer)}
    assert by_hand["final"] != by_hand["base"]  # so the report cannot have mixed them up
    for name, acc in by_hand.items():
        assert report["scores"][name]["fed_mc"]["acc,none"] == pytest.approx(acc)
    assert 0 <= report["scores"]["final"]["fed_gen"]["exact_match,none"] <= 1
    assert not list(run_dir.glob(".lm-eval-*"))  # the scratch copies are gone
    code, out = cli("lm-eval", str(run_dir), "--tasks", "fed_mc,no_such_task", "--include-path", str(tasks))
    assert code != 0 and "knows no task no_such_task" in out, out
