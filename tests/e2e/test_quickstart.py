"""The README's quickstart, for real: bundled SmolLM2, built-in non-IID tasks, 4 clients, 5 rounds."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.helpers.configs import BUNDLED_MODEL, run_example

pytestmark = BUNDLED_MODEL
README = Path(__file__).parents[2] / "README.md"


def test_quickstart_learns_and_exports_a_loadable_adapter(tmp_path):
    metrics = run_example("examples/quickstart.yaml", tmp_path)
    run_dir = tmp_path / "quickstart"
    first, last = metrics[0], metrics[-1]
    assert [m["round"] for m in metrics] == list(range(6))
    assert all(len(m["clients"]) == 4 for m in metrics[1:])
    # learning happened: held-out loss falls a lot, exact-match rises from (near) zero
    assert last["eval_loss"] < 0.6 * first["eval_loss"]
    assert first["eval_accuracy"] <= 0.05 and last["eval_accuracy"] >= first["eval_accuracy"] + 0.2
    # the README's table is what this code computes (to its 3 decimals; another CPU's kernels may
    # round the last one the other way)
    for m, (train, evaluated) in zip(metrics, readme_losses(), strict=True):
        assert train is None or abs(m["train_loss"] - train) <= 1.5e-3, (m["round"], m["train_loss"], train)
        assert abs(m["eval_loss"] - evaluated) <= 1.5e-3, (m["round"], m["eval_loss"], evaluated)

    from fedtune.models.loading import load_model

    base = load_model("smollm2-135m")
    model = PeftModel.from_pretrained(base.model, run_dir / "final_adapter")
    final = load_file(run_dir / "checkpoints" / "round_0005" / "params.safetensors")
    got = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(got[k], final[k]) for k in final)

    # the merged export: plain transformers and its GGUF give the adapter's logits
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.helpers.cli import cli

    code, out = cli("export", str(run_dir), "--gguf")
    assert code == 0, out
    ids = torch.tensor([[1, 4093, 314, 253, 1690, 28]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()(input_ids=ids).logits
        assert torch.allclose(merged, expected, atol=1e-4), (merged - expected).abs().max()
        back = AutoModelForCausalLM.from_pretrained(run_dir / "merged", gguf_file="model.gguf").eval()
        assert torch.allclose(back(input_ids=ids).logits, expected, atol=1e-4)
    field = gguf.GGUFReader(str(run_dir / "merged" / "model.gguf")).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "smollm"  # the bundled GGUF's pre-tokenizer


def readme_losses() -> list[tuple[float | None, float]]:
    """(train loss, eval loss) per round from the README's quickstart table."""
    rows = [line.split("|")[1:4] for line in README.read_text().splitlines() if re.match(r"\| \d \| ", line)]
    return [(None if t.strip() == "-" else float(t), float(e)) for _, t, e in rows]
