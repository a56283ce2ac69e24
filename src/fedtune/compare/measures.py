"""What one run of a comparison measured, read back from its metrics.jsonl.

Per client means divided by the clients a round sampled (bytes: by the federation's clients, since
every client holds its share of the run's traffic over the rounds). ``server_s_per_round`` is a
round's time outside the clients' hands (train_s − clients_s): the server's and the framework's
share, whether clients ran in turn, side by side in lanes, or remotely. (train_s − local_train_s,
its earlier form, is negative once clients train side by side.)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedtune.reporting.metrics import benchmark_metrics

MEASURES: dict[str, str] = {  # name -> what it is (comparison.json and the table use these names)
    "final_eval_loss": "eval loss after the last round",
    "start_eval_loss": "eval loss before round 1 (the base model as it starts: zero-shot)",
    "final_accuracy": "exact-match (or the task's metric) after the last round",
    "rounds_to_target": "first round whose eval loss is at most compare.target_loss",
    "bytes_up_per_client": "bytes a client sent over the run, on average",
    "bytes_down_per_client": "bytes a client received over the run, on average",
    "client_s_per_round": "a sampled client's compute seconds in a round",
    "client_peak_bytes": "the largest client peak memory of any round (its model part + activations)",
    "client_flops_per_round": "a sampled client's analytic FLOPs in a round",
    "server_s_per_round": "a round's seconds outside the clients' compute",
    "epsilon": "client-level DP: the accountant's epsilon at privacy.delta after the last round",
    "final_emulator_gap": "offsite: the emulator + adapter's eval loss minus the plug-in's, after the last round",
    "final_client_eval_loss": "evaluation.per_client: the global model's loss on each client's own held-out share, "
    "averaged over clients, after the last round",
    "final_personal_eval_loss": "personalised: each client's personalised model's loss on its own held-out share, "
    "averaged over clients, after the last round",
    "final_reward_accuracy": "preference pairs: the share of held-out pairs whose implicit reward (the model's "
    "log-ratio to the initial adapter) ranks the chosen reply first, after the last round (0.5 at the start)",
    "final_preference_accuracy": "preference pairs: the share of held-out pairs whose chosen reply the model finds "
    "likelier, after the last round",
    "start_preference_accuracy": "preference pairs: final_preference_accuracy before round 1 (the initial adapter)",
    "final_personal_gain": "personalised: final_client_eval_loss minus final_personal_eval_loss in the same run "
    "(positive: the personalised models do better on their clients' shares)",
}


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clients_s(record: dict[str, Any]) -> float:
    """The round's seconds in the clients' hands; runs recorded before clients_s existed served clients in
    turn, where their summed training time stood for it."""
    return record["clients_s"] if "clients_s" in record else record.get("local_train_s", 0.0)


def _gain(record: dict[str, Any]) -> float | None:
    """How much lower the personalised models' loss is than the global model's, on the clients' own shares."""
    if record.get("client_eval_loss_mean") is None or record.get("personal_eval_loss_mean") is None:
        return None
    return record["client_eval_loss_mean"] - record["personal_eval_loss_mean"]


def run_measures(history: list[dict[str, Any]], num_clients: int, target_loss: float | None) -> dict[str, Any]:
    """The run's MEASURES (None where it did not measure one) and its curves by evaluated round."""
    trained = [r for r in history if r["round"] > 0]
    evals = [r for r in history if r.get("eval_loss") is not None]
    if not trained or not evals:
        raise ValueError("the run has no trained and evaluated round")
    sampled = [max(1, len(r["clients"])) for r in trained]

    def per_client_round(key: str) -> float | None:
        if not all(key in r for r in trained):
            return None
        return statistics.fmean(r[key] / k for r, k in zip(trained, sampled, strict=True))

    last = evals[-1]
    reached = [r["round"] for r in evals if target_loss is not None and r["eval_loss"] <= target_loss]
    measures = {
        "final_eval_loss": last["eval_loss"],
        "start_eval_loss": evals[0]["eval_loss"] if evals[0]["round"] == 0 else None,
        "final_accuracy": last.get("eval_accuracy"),
        "final_reward_accuracy": last.get("eval_reward_accuracy"),
        "final_preference_accuracy": last.get("eval_preference_accuracy"),
        "start_preference_accuracy": evals[0].get("eval_preference_accuracy") if evals[0]["round"] == 0 else None,
        "rounds_to_target": reached[0] if reached else None,
        "bytes_up_per_client": sum(r["bytes_up"] for r in trained) / num_clients,
        "bytes_down_per_client": sum(r["bytes_down"] for r in trained) / num_clients,
        "client_s_per_round": per_client_round("local_train_s"),
        "client_peak_bytes": max(r["client_peak_bytes"] for r in trained)
        if all("client_peak_bytes" in r for r in trained)
        else None,
        "client_flops_per_round": per_client_round("client_flops"),
        "server_s_per_round": statistics.fmean(max(0.0, r["train_s"] - _clients_s(r)) for r in trained),
        "epsilon": next((r["dp_epsilon"] for r in reversed(history) if "dp_epsilon" in r), None),
        "final_emulator_gap": last.get("emulator_gap"),
        "final_client_eval_loss": last.get("client_eval_loss_mean"),
        "final_personal_eval_loss": last.get("personal_eval_loss_mean"),
        "final_personal_gain": _gain(last),
    }
    scored = [r for r in evals if benchmark_metrics(r)]  # evaluation.tasks: final_{task}_{metric}
    measures |= {f"final_{k}": v for k, v in benchmark_metrics(scored[-1]).items()} if scored else {}
    return {"measures": measures, "curves": curves(history, num_clients)}


def curves(history: list[dict[str, Any]], num_clients: int) -> dict[str, list[float]]:
    """At each evaluated round: eval loss, and the bytes (up + down) and client FLOPs per client so far."""
    out: dict[str, list[float]] = {"round": [], "eval_loss": [], "bytes_per_client": [], "client_flops": []}
    traffic = flops = 0.0
    for r in history:
        if r["round"] > 0:
            traffic += (r["bytes_up"] + r["bytes_down"]) / num_clients
            flops += r.get("client_flops", 0.0) / num_clients
        if r.get("eval_loss") is not None:
            out["round"].append(r["round"])
            out["eval_loss"].append(r["eval_loss"])
            out["bytes_per_client"].append(traffic)
            out["client_flops"].append(flops)
    return out
