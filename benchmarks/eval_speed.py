"""The quickstart's per-round evaluation: one cached pass (``evaluation.scoring``) vs the plain path.

The quickstart's model (bundled SmolLM2-135M with its LoRA adapter, untrained: round 0, where every
row generates all ``max_new_tokens``) and its 40 held-out examples; each variant evaluates loss and
exact-match ``--repeats`` times, alternating, in one process:

- ``plain``: a forward over the right-padded prompt+target sequences for the loss, then ``generate``
  from the left-padded prompts (the prompts run twice, the shared system turn in every row);
- ``cached``: what ``evaluation.harness.evaluate`` does: one forward per batch with each run of prompts'
  shared prefix computed once, the greedy text read off that forward while it follows the target, decoding
  from its attention cache only after that, and each row's generation stopped once its text can no longer be
  an exact match (``metrics.could_still_match``).

With ``--trained-rounds R`` (default 2) the quickstart is first trained for R rounds (``fedtune run``,
no evaluation) and the same comparison runs again on its adapter: a trained model's rows match their
targets longer, so they generate more before they stop.

    python benchmarks/eval_speed.py [--repeats 5] [--batch-sizes 20 40] [--trained-rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import quickstart_setup, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--trained-rounds", type=int, default=2, help="0: the untrained adapter only")
    args = ap.parse_args()

    from fedtune.assembly import build_workbench, eval_subset, plan_of
    from fedtune.config import load_config
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.evaluation.harness import EvalSet
    from fedtune.evaluation.metrics import could_still_match, exact_match
    from fedtune.evaluation.scoring import score, shared_prefix

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("examples/quickstart.yaml", [f"output.dir={tmp}"])
        bench = build_workbench(cfg, plan_of(cfg), announce=False)
        data = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
        eval_set = EvalSet.build(eval_subset(data.eval, cfg.evaluation.max_samples), bench.encoder)
    model, tok = bench.adapter.model, bench.tokenizer
    prompts, conts = eval_set.scored_rows()
    new = cfg.evaluation.max_new_tokens

    def hopeless(i: int, text: str) -> bool:
        return not could_still_match(text, eval_set.examples[i].target)

    def once(variant: str, batch: int) -> dict:
        start = time.perf_counter()
        s = score(
            model,
            tok,
            prompts,
            conts,
            batch_size=batch,
            max_new_tokens=new,
            cache_prompts=variant == "cached",
            give_up=hopeless if variant == "cached" else None,
        )
        seconds = time.perf_counter() - start
        loss = -sum(s.log_likelihood) / sum(s.tokens)
        hits = sum(exact_match(p, ex.target) for p, ex in zip(s.generations, eval_set.examples, strict=True))
        return {"seconds": seconds, "loss": loss, "generations": s.generations, "hits": hits}

    def compare() -> list[dict]:
        once("cached", args.batch_sizes[0])  # warm-up: first-call allocations
        rows = []
        for batch in args.batch_sizes:
            runs: dict[str, list[dict]] = {"plain": [], "cached": []}
            for _ in range(args.repeats):
                for variant in runs:
                    runs[variant].append(once(variant, batch))
            plain, cached = runs["plain"], runs["cached"]
            rows.append(
                {
                    "batch_size": batch,
                    "plain_s": [r["seconds"] for r in plain],
                    "cached_s": [r["seconds"] for r in cached],
                    "plain_median_s": statistics.median(r["seconds"] for r in plain),
                    "cached_median_s": statistics.median(r["seconds"] for r in cached),
                    "speedup": statistics.median(r["seconds"] for r in plain)
                    / statistics.median(r["seconds"] for r in cached),
                    "loss_plain": plain[0]["loss"],
                    "loss_cached": cached[0]["loss"],
                    "same_generations": sum(  # rows given up early differ; their exact-match cannot
                        a == b for a, b in zip(plain[0]["generations"], cached[0]["generations"], strict=True)
                    ),
                    "exact_match_hits": [plain[0]["hits"], cached[0]["hits"]],
                }
            )
        return rows

    rows = compare()
    trained = []
    if args.trained_rounds:
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "fedtune.cli", "run", "examples/quickstart.yaml", f"output.dir={tmp}"]
            cmd += [f"federation.rounds={args.trained_rounds}", "evaluation.every=0", "evaluation.at_start=false"]
            subprocess.run(cmd, check=True, capture_output=True)
            latest = Path(tmp, "quickstart", "checkpoints", "LATEST").read_text().strip()
            state = load_file(str(Path(tmp, "quickstart", "checkpoints", latest, "params.safetensors")))
        bench.adapter.set_state(state)
        trained = compare()
    write_result(
        "eval_speed",
        {
            "setup": quickstart_setup(
                0,
                0,
                max_new_tokens=new,
                shared_prefix_tokens=shared_prefix(prompts),
                prompt_tokens=[min(map(len, prompts)), max(map(len, prompts))],
            ),
            "repeats": args.repeats,
            "rows": rows,
            "trained_rounds": args.trained_rounds,
            "trained_rows": trained,
        },
    )


if __name__ == "__main__":
    main()
