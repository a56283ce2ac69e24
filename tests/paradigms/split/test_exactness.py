"""With one client and no compression, split training is training the whole model: the same adapter."""

from __future__ import annotations

import pytest
import torch

from fedtune.client.trainer import LocalTrainer
from fedtune.config import load_config
from fedtune.experiment import run_experiment
from tests.helpers.building import build
from tests.helpers.configs import TINY_OVERRIDES

ONE_CLIENT = [
    *TINY_OVERRIDES,
    "model.name=tiny-llama-deep",  # 4 blocks: 1 + 2 + 1 (u) or 2 + 2 (vanilla)
    "partition.method=iid",
    "partition.num_clients=1",
    "federation.rounds=1",
    "training.local_steps=3",
    "training.grad_accum=2",  # optimizer steps of two micro-batches, each with its own exchanges
    "training.max_grad_norm=0.05",  # small enough that global clipping acts on every step
    "aggregation.lora=naive",  # one client: the aggregate is its adapter (exact mode would refactor it by SVD)
    "evaluation.every=0",
    "evaluation.at_start=false",
    "evaluation.exact_match=false",
]
# float32 throughout; the split side sums squared norms per side instead of one norm of norms, and
# adds the update back onto the global adapter, so equality holds to rounding, not to the bit.
# SGD carries that rounding through linearly (measured: 7.5e-9 on updates of 0.013, 6e-7 relative,
# most of it from the clipping scale; 1.4e-8 relative without clipping). Adam divides each
# gradient entry by its own magnitude, so entries near its eps turn rounding of 1e-7 relative into
# update differences of ~2e-5 relative (measured 1.3e-6 on updates of 0.06 in this environment;
# 1.9e-9 in an earlier one); a wrong optimizer, clipping or cut differs by ~1e-2 (measured
# 0.0125 without global clipping), three orders above either bound.
OPTIMIZERS = {
    "sgd": (["training.optimizer=sgd", "training.lr=1.0"], 1e-5),
    "adamw": (["training.optimizer=adamw", "training.lr=2e-2"], 2e-4),
}


def _unsplit(tmp_path, overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = load_config("examples/quickstart.yaml", [*overrides, "paradigm=parameter_sharing", f"output.dir={tmp_path}"])
    built = build(cfg)
    bench, data = built.bench, built.clients
    trainer = LocalTrainer(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
    out = trainer.train(bench.adapter, 0, 1, data[0])
    assert not out.result.diverged
    return bench.adapter.get_state()


@pytest.mark.parametrize(
    "cut",
    [
        ["paradigm.shape=u", "paradigm.client_front=1", "paradigm.client_back=1"],
        ["paradigm.shape=u", "paradigm.client_front=1", "paradigm.client_back=1", "paradigm.server_part=per_client"],
        ["paradigm.shape=vanilla", "paradigm.client_front=2"],
    ],
    ids=["u-shared", "u-per-client", "vanilla"],
)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_one_client_split_training_gives_the_unsplit_adapter(tmp_path, cut, optimizer):
    settings, tolerance = OPTIMIZERS[optimizer]
    one_client = [*ONE_CLIENT, *settings]
    cfg = load_config("examples/quickstart.yaml", [*one_client, "paradigm=split", *cut, f"output.dir={tmp_path / 's'}"])
    split = run_experiment(cfg).state.params
    whole = _unsplit(tmp_path / "w", one_client)
    assert split.keys() == whole.keys()
    start = build(cfg).bench.initial
    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole)
    assert moved > 1e-3  # it trained
    worst = max(float((split[k] - whole[k]).abs().max()) for k in whole)
    assert worst <= tolerance * moved, f"split and unsplit adapters differ by {worst:.3g}"


@pytest.mark.parametrize("cut", [["paradigm.shape=u", "paradigm.client_front=1", "paradigm.client_back=1"]])
def test_full_tuning_of_blocks_split_gives_the_unsplit_blocks(tmp_path, cut):
    """adapter.method=blocks: each side tunes the whole weights of its blocks; one client's split training is
    the unsplit training of every block."""
    settings, tolerance = OPTIMIZERS["sgd"]
    one_client = [*(o for o in ONE_CLIENT if not o.startswith("aggregation.lora")), *settings, "adapter.method=blocks"]
    one_client.append("training.lr=0.1")
    cfg = load_config("examples/quickstart.yaml", [*one_client, "paradigm=split", *cut, f"output.dir={tmp_path / 's'}"])
    split = run_experiment(cfg).state.params
    whole = _unsplit(tmp_path / "w", one_client)
    assert split.keys() == whole.keys() and {k.split(".layers.")[1].split(".")[0] for k in whole} == set("0123")
    start = build(cfg).bench.initial
    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole)
    assert moved > 1e-4  # it trained
    worst = max(float((split[k] - whole[k]).abs().max()) for k in whole)
    assert worst <= tolerance * moved, f"split and unsplit blocks differ by {worst:.3g}"
