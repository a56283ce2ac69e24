"""A client's private training for one round: its seeded batch plan, schedule and progress bar.

Every paradigm whose clients train on their own data calls this; what differs between them is the
adapter they start from, the corrections (FedProx, SCAFFOLD) and the loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.client.batching import micro_batches
from fedtune.client.corrections import Correction
from fedtune.client.cost import FlopModel
from fedtune.client.data import ClientData
from fedtune.client.local_training import LocalResult, train_locally
from fedtune.client.schedule import RoundSchedule
from fedtune.config import TrainingConfig
from fedtune.data.tokenize import collate
from fedtune.losses import LossFn, token_loss_sum
from fedtune.reporting.console import bar_disabled


def round_plan(
    seed: int, round_index: int, client_id: int, num_examples: int, cfg: TrainingConfig
) -> tuple[int, list[np.ndarray]]:
    """(torch seed, micro-batch index arrays) of one client's round: a pure function of its arguments."""
    rng = np.random.default_rng([seed, round_index, client_id])
    torch_seed = int(rng.integers(2**63 - 1))
    plan = micro_batches(num_examples, cfg.batch_size, cfg.grad_accum, rng, cfg.local_steps, cfg.local_epochs)
    return torch_seed, plan


@dataclass(frozen=True)
class TrainOutcome:
    result: LocalResult
    elapsed_s: float  # wall time of the round's training, batching included


class LocalTrainer:
    """Trains the active adapter of ``adapter`` on one client's data for one round."""

    def __init__(self, training: TrainingConfig, total_rounds: int, seed: int, pad_id: int, progress: bool = False):
        self.cfg, self.total_rounds, self.seed, self.pad_id = training, total_rounds, seed, pad_id
        self.progress = progress
        self._cost_of: tuple = (None, None)

    def _cost(self, adapter: AdapterModel) -> FlopModel | None:
        if self._cost_of[0] is not adapter.model:  # the FLOP model of the model last trained
            self._cost_of = (adapter.model, FlopModel.of_model(adapter.model))
        return self._cost_of[1]

    def train(
        self,
        adapter: AdapterModel,
        client_id: int,
        round_index: int,
        data: ClientData,
        corrections: Sequence[Correction] = (),
        loss: LossFn = token_loss_sum,
    ) -> TrainOutcome:
        cfg = self.cfg
        start = time.perf_counter()
        torch_seed, plan = round_plan(self.seed, round_index, client_id, len(data.train), cfg)
        batches = [collate([data.train[i] for i in idx], self.pad_id) for idx in plan]
        steps = -(-len(batches) // cfg.grad_accum)
        schedule = RoundSchedule.of(cfg, self.total_rounds)

        def lr(step: int) -> float:
            return schedule.lr_at(round_index, step, steps)

        bar = tqdm(
            total=steps, desc=f"  client {client_id}", leave=False, disable=bar_disabled(self.progress), unit="step"
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)  # dropout and any other torch randomness of this round
            result = train_locally(
                adapter.model,
                list(adapter.params.values()),
                batches,
                cfg.grad_accum,
                lr,
                cfg.weight_decay,
                cfg.max_grad_norm,
                on_step=lambda _s, value: (bar.update(1), bar.set_postfix(loss=f"{value:.3f}")),
                optimizer=cfg.optimizer,
                corrections=corrections,
                loss=loss,
                cost=self._cost(adapter),
            )
        bar.close()
        return TrainOutcome(result, time.perf_counter() - start)
