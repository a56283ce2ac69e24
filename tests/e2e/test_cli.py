"""End-to-end: the real CLI on the tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.reporting.metrics import TIMED
from tests.helpers.cli import cli, read_metrics, run_tiny
from tests.helpers.configs import TINY_OVERRIDES
from tests.helpers.kill import kill_after_round

REQUIRED = {
    "round",
    "clients",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "local_train_s",
}


def test_run_writes_a_complete_run_directory(tmp_path):
    code, out = run_tiny(tmp_path)
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics[1:]:
        assert m.keys() >= REQUIRED
        assert m["clients"] == [0, 1, 2, 3] and m["bytes_up"] > 0 and m["bytes_down"] > 0
    assert metrics[0]["eval_loss"] > 0 and "eval_accuracy_by_task" in metrics[-1]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]  # lr 5e-3 on a tiny model: loss must move down
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["total_bytes_up"] == sum(m["bytes_up"] for m in metrics[1:])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*")) == [f"round_000{i}" for i in range(4)]
    assert "rounds" in out and "summary" in out

    # final_adapter loads with plain peft, onto the base model its config names, and equals the last global state
    cfg = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, run_dir / "final_adapter")
    last = load_file(run_dir / "checkpoints" / "round_0003" / "params.safetensors")
    loaded = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert loaded.keys() == last.keys() and all(torch.equal(loaded[k], last[k]) for k in last)


def test_adapters_saved_every_n_rounds_are_those_rounds_global_adapters(tmp_path):
    code, out = run_tiny(tmp_path, "output.save_adapter_every=2")
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    saved = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert saved == ["round_0002", "round_0003"]  # every 2nd round and the last (FlowerTune's save-every-round)
    for name in saved:
        base = AutoModelForCausalLM.from_pretrained(
            json.loads((run_dir / "adapters" / name / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
        model = PeftModel.from_pretrained(base, run_dir / "adapters" / name)
        want = load_file(run_dir / "checkpoints" / name / "params.safetensors")
        got = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    code, out = run_tiny(tmp_path, name="plain")
    assert code == 0, out
    losses = lambda d: [(m.get("train_loss"), m["eval_loss"]) for m in read_metrics(d)]  # noqa: E731
    assert losses(run_dir) == losses(tmp_path / "plain")  # saving along the way changes nothing of the run


def test_bad_config_is_rejected_before_any_work(tmp_path):
    code, out = run_tiny(tmp_path, "training.lr_schedul=cosine")
    assert code == 2
    assert "unknown key 'training.lr_schedul'" in out and "Did you mean 'lr_schedule'" in out
    assert not (tmp_path / "tiny").exists()
    code, out = run_tiny(tmp_path, "partition.method=by_feld")
    assert code == 2 and "'iid', 'dirichlet', 'by_field' or 'quantity_skew'" in out


def test_existing_run_is_not_overwritten_and_resume_checks_config(tmp_path):
    assert run_tiny(tmp_path, "federation.rounds=1")[0] == 0
    code, out = run_tiny(tmp_path, "federation.rounds=1")
    assert code == 2 and "--resume" in out
    code, out = run_tiny(tmp_path, "federation.rounds=1", "training.lr=0.1", "--resume")
    assert code == 2 and "training.lr" in out
    code, out = run_tiny(tmp_path, "federation.rounds=2", "--resume")  # extending a run is allowed
    assert code == 0, out
    assert [m["round"] for m in read_metrics(tmp_path / "tiny")] == [0, 1, 2]


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "algorithm",
    [
        [],
        [
            "aggregation.name=fedadam",
            "aggregation.scaffold=true",
            "training.proximal_mu=0.01",
            "federation.clients_per_round=3",
        ],
        pytest.param(["adapter.client_ranks=[2,4,8]", "federation.clients_per_round=3"], marks=pytest.mark.slow),
        pytest.param(
            [
                "compression.uplink=[{name: randk, fraction: 0.2}, {name: int8, rounding: stochastic}]",
                "compression.error_feedback=true",
                "compression.downlink=[int8]",
                "federation.clients_per_round=3",
            ],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            [
                "compression.uplink=[{name: topk, fraction: 0.1}]",
                "compression.error_feedback=true",
                "compression.downlink=[{name: topk, fraction: 0.2}, int4]",
                "compression.downlink_updates=true",
                "federation.clients_per_round=2",
            ],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            [
                "privacy.client_dp=central",
                "privacy.noise_multiplier=0.8",
                "privacy.clip_norm=0.05",
                "privacy.adaptive_clip={lr: 0.3}",
                "privacy.noise_seed=3",  # the two runs compared must draw the same noise; resume reads the checkpoint's
                "federation.clients_per_round=2",
            ],
            marks=pytest.mark.slow,
        ),
        [
            "privacy.client_dp=distributed",
            "privacy.noise_multiplier=0.8",
            "privacy.clip_norm=0.05",
            "privacy.secure_aggregation={threshold: 0.6}",
            "privacy.noise_seed=3",
            "federation.clients_per_round=3",
        ],
        pytest.param(  # DPO: pair batches, the reference's log-probabilities taken in each round (here the initial's)
            [
                "paradigm.name=dpo",
                "data.dataset=builtin:preferences",
                "paradigm.reference=initial",
                "federation.clients_per_round=3",
            ],
            marks=pytest.mark.slow,
        ),
    ],
    ids=[
        "fedavg",
        "fedadam+scaffold+fedprox",
        "flexlora_mixed_ranks",
        "compressed+error_feedback",
        "downlink_updates+partial",
        "dp_fedavg+adaptive_clip+poisson",
        "distributed_dp+secure_aggregation",
        "dpo_initial_reference",
    ],
)
def test_resume_after_kill_is_bit_identical(tmp_path, algorithm):
    """Kill a real CLI process mid-run (SIGKILL), resume it, and compare with an uninterrupted run.

    The second case carries server moments, the server control variate and per-client control
    variates through the checkpoint, with partial participation; the last, each client's
    error-feedback residual and seeded random choices of the codecs; with downlink updates and
    partial participation, the server's per-client replicas (shared where equal) and the clients'
    held adapters; with client-level DP, the noise stream, the adaptive clipping norm and Poisson sampling.
    """
    args = [
        "examples/tiny.yaml",
        *TINY_OVERRIDES,
        "federation.rounds=5",
        "training.local_steps=6",
        f"output.dir={tmp_path}",
        *algorithm,
    ]
    assert cli("run", *args, "output.name=straight")[0] == 0

    kill_after_round([*args, "output.name=killed"], tmp_path / "killed")

    code, out = cli("resume", str(tmp_path / "killed"))
    assert code == 0, out
    a, b = _adapter_tensors(tmp_path / "straight"), _adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rounds = [m["round"] for m in read_metrics(tmp_path / "killed")]
    assert rounds == [0, 1, 2, 3, 4, 5]  # every round exactly once
    # timings differ, and so does the length of their decimal text in each reply header (bytes_up)
    drop = {*TIMED, "bytes_up"}
    killed, straight = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight")
    assert [{k: v for k, v in m.items() if k not in drop} for m in killed] == [
        {k: v for k, v in m.items() if k not in drop} for m in straight
    ]
    assert all(abs(a["bytes_up"] - b["bytes_up"]) < 100 for a, b in zip(killed[1:], straight[1:], strict=True))


def test_diverged_client_is_dropped_and_too_few_stops(tmp_path, monkeypatch):
    import fedtune.client.trainer as trainer
    from fedtune.client.local_training import LocalResult

    real, calls = trainer.train_locally, []

    def flaky(*a, **k):  # client 0 (first served each round) hits a NaN loss
        calls.append(1)
        if len(calls) % 4 == 1:
            return LocalResult(0, float("nan"), 0, 0.0, True, "non-finite loss (nan) at local step 0")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_locally", flaky)
    # clients in turn in this process (runtime.lanes=1), where the patch and its call count live
    code, out = run_tiny(tmp_path, "federation.rounds=2", "runtime.lanes=1")
    assert code == 0, out
    metrics = read_metrics(tmp_path / "tiny")
    assert all(m["clients"] == [1, 2, 3] and "non-finite" in m["dropped"]["0"] for m in metrics[1:])

    calls.clear()
    code, out = run_tiny(tmp_path, "federation.rounds=2", "federation.min_clients=4", "runtime.lanes=1", name="strict")
    assert code == 2 and "only 3 of 4 clients" in out and "round_0000" in out
    assert (tmp_path / "strict" / "checkpoints" / "round_0000" / "state.json").is_file()
    assert not (tmp_path / "strict" / "checkpoints" / "round_0001").exists()


def test_user_data_dirichlet_epochs_and_per_client_eval(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}],
            "topic": f"t{i % 3}",
        }
        for i in range(90)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = run_tiny(
        tmp_path,
        f"data.dataset={data}",
        "partition.method=dirichlet",
        "partition.field=topic",
        "partition.alpha=5",
        "partition.num_clients=3",
        "partition.holdout_fraction=0.2",
        "evaluation.per_client=true",
        "training.local_steps=null",
        "training.local_epochs=0.5",
        "aggregation.weighting=tokens",
    )
    assert code == 0, out
    last = read_metrics(tmp_path / "tiny")[-1]
    assert "eval_accuracy" not in last  # user data: no exact-match unless asked
    assert set(last["client_eval"]) == {"0", "1", "2"} and "client_eval_loss_mean" in last


def test_exact_match_final_generates_only_after_the_last_round(tmp_path):
    """The loss every round, exact-match (generation, most of an evaluation's cost) once, server and clients."""
    extra = ["evaluation.exact_match=final", "partition.holdout_fraction=0.2", "evaluation.per_client=true"]
    code, out = run_tiny(tmp_path, *extra)
    assert code == 0, out
    rows = read_metrics(tmp_path / "tiny")
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all("eval_loss" in r for r in rows)
    for r in rows[:-1]:
        assert "eval_accuracy" not in r and all("accuracy" not in m for m in r.get("client_eval", {}).values())
    assert "eval_accuracy" in rows[-1] and all("accuracy" in m for m in rows[-1]["client_eval"].values())


def test_data_and_report_commands(tmp_path):
    code, out = cli("data", "examples/tiny.yaml", *TINY_OVERRIDES)
    assert code == 0 and "arithmetic: 24" in out and "by task" in out
    assert run_tiny(tmp_path, "federation.rounds=1")[0] == 0
    code, out = cli("report", str(tmp_path / "tiny"))
    assert code == 0 and "exact-match" in out
    code, out = cli("report", str(tmp_path / "nothing"))
    assert code == 2 and "metrics.jsonl does not exist" in out


def test_missing_data_file_error(tmp_path):
    code, out = run_tiny(tmp_path, f"data.dataset={tmp_path}/nope.jsonl")
    assert code == 2 and "nope.jsonl does not exist" in out


@pytest.mark.parametrize("bad", ["partition.num_clients=9"])
def test_partition_error_names_client(tmp_path, bad):
    code, out = run_tiny(tmp_path, bad)
    assert code == 2 and "clients 4..8 would be empty" in out


def test_bf16_base_model_keeps_an_fp32_adapter(tmp_path):
    code, out = run_tiny(tmp_path, "model.dtype=bfloat16", "federation.rounds=1")
    assert code == 0, out
    tensors = _adapter_tensors(tmp_path / "tiny")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert read_metrics(tmp_path / "tiny")[-1]["eval_loss"] > 0


def test_error_text_with_brackets_is_printed_verbatim(tmp_path):
    code, out = run_tiny(tmp_path, "adapter.target_modules=[nope]")
    assert code == 2 and "adapter.target_modules=['nope']" in out and "q_proj" in out


def test_lora_aggregation_modes_report_and_cost(tmp_path):
    for mode in ("exact", "naive", "ffa"):
        code, out = run_tiny(tmp_path, f"aggregation.lora={mode}", "federation.rounds=2", name=mode)
        assert code == 0, out
    exact, naive, ffa = (read_metrics(tmp_path / m)[-1] for m in ("exact", "naive", "ffa"))
    assert 0 < exact["lora_truncation_error"] < 1
    assert 0 < naive["lora_factor_averaging_error"] < 1
    assert "lora_truncation_error" not in ffa and "lora_factor_averaging_error" not in ffa
    # FFA-LoRA sends only B: about half the bytes each way
    assert 0.4 < ffa["bytes_up"] / exact["bytes_up"] < 0.6 and 0.4 < ffa["bytes_down"] / exact["bytes_down"] < 0.6
    log = (tmp_path / "naive" / "run.log").read_text()
    assert "inexact" in log and "lora_factor_averaging_error" in log
    # the FFA export still carries A (frozen at its seeded init), so peft loads it as usual
    assert any(".lora_A." in k for k in _adapter_tensors(tmp_path / "ffa"))


def test_mixed_ranks_each_client_trains_its_own_rank(tmp_path, monkeypatch):
    from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient

    seen: dict[int, set[int]] = {}
    real = ParameterSharingClient.train

    def spy(self, client_id, req, state):
        params = self.downlink.decode(req.params, self.adapter.params)
        seen.setdefault(client_id, set()).update(v.shape[0] for k, v in params.items() if ".lora_A." in k)
        return real(self, client_id, req, state)

    monkeypatch.setattr(ParameterSharingClient, "train", spy)
    for mode in ("exact", "naive"):
        seen.clear()
        code, out = run_tiny(
            tmp_path,
            "adapter.r=16",
            "adapter.client_ranks=[2,4,8,16]",
            f"aggregation.lora={mode}",
            "federation.rounds=2",
            "runtime.lanes=1",  # the spy records in this process: clients in turn here, not in lanes
            name=mode,
        )
        assert code == 0, out
        assert seen == {0: {2}, 1: {4}, 2: {8}, 3: {16}}
        tensors = _adapter_tensors(tmp_path / mode)
        assert {v.shape[0] for k, v in tensors.items() if ".lora_A." in k} == {16}  # the export has the global rank
    exact, naive = read_metrics(tmp_path / "exact")[-1], read_metrics(tmp_path / "naive")[-1]
    assert "lora_truncation_error" in exact and "lora_factor_averaging_error" in naive


@pytest.mark.parametrize(
    "overrides",
    [
        ["aggregation.name=fedavgm"],
        ["aggregation.name=fedyogi", "aggregation.combine=median", "aggregation.bias_correction=true"],
        ["aggregation.name=fedadagrad", "aggregation.combine=trimmed_mean", "aggregation.clip_norm=1.0"],
        ["aggregation.combine=krum", "aggregation.byzantine=1", "aggregation.max_update_norm=100"],
        ["training.optimizer=sgd", "training.lr=0.5", "aggregation.weighting=uniform"],
    ],
    ids=["fedavgm", "fedyogi_median", "fedadagrad_trimmed_clip", "krum", "sgd_uniform"],
)
def test_every_aggregation_family_runs_from_the_cli(tmp_path, overrides):
    code, out = run_tiny(tmp_path, "federation.rounds=2", *overrides)
    assert code == 0, out
    metrics = read_metrics(tmp_path / "tiny")
    assert [m["round"] for m in metrics] == [0, 1, 2] and all(not m.get("dropped") for m in metrics[1:])
    assert "lora_factor_averaging_error" in metrics[-1] or "lora_truncation_error" in metrics[-1]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]


def test_joint_training_runs_from_the_cli_and_trains_what_clients_alone_do(tmp_path, monkeypatch):
    """runtime.joint_clients: the same federation to float order (a float32 model here: rows padded to a
    longer width and matrices of more rows change the summation order, nothing else)."""
    from fedtune.client.trainer import LocalTrainer

    common = ("runtime.lanes=1", "federation.rounds=2")
    assert run_tiny(tmp_path, *common, name="alone")[0] == 0
    groups, joint_round = [], LocalTrainer.train_jointly

    def spy(self, adapter, routing, round_index, jobs):
        groups.append([job[0] for job in jobs])
        return joint_round(self, adapter, routing, round_index, jobs)

    monkeypatch.setattr(LocalTrainer, "train_jointly", spy)
    code, out = run_tiny(tmp_path, *common, "runtime.joint_clients=4", name="joint")
    assert code == 0, out
    assert groups == [[0, 1, 2, 3]] * 2  # each round's four clients in one joint pass
    alone, joint = read_metrics(tmp_path / "alone"), read_metrics(tmp_path / "joint")
    assert [r["round"] for r in joint] == [0, 1, 2]
    for a, j in zip(alone[1:], joint[1:], strict=True):
        assert j["clients"] == a["clients"] == [0, 1, 2, 3]
        assert abs(j["bytes_up"] - a["bytes_up"]) <= 64  # the same tensors; headers carry times as text
        assert (j["local_steps"], j["train_tokens"], j["client_flops"]) == (
            a["local_steps"],
            a["train_tokens"],
            a["client_flops"],
        )
        assert j["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert j["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    a = load_file(str(tmp_path / "alone" / "final_adapter" / "adapter_model.safetensors"))
    j = load_file(str(tmp_path / "joint" / "final_adapter" / "adapter_model.safetensors"))
    gap = torch.cat([(a[k] - j[k]).flatten() for k in a])
    assert gap.norm() <= 1e-4 * torch.cat([v.flatten() for v in a.values()]).norm()
