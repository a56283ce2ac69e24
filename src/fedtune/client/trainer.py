"""A client's private training for one round: its seeded batch plan, schedule and progress bar.

Every paradigm whose clients train on their own data calls this; what differs between them is the
adapter they start from, the corrections (FedProx, SCAFFOLD) and the loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.routed_lora import RoutedLoRA
from fedtune.client.batching import micro_batches, poisson_batches
from fedtune.client.corrections import Correction
from fedtune.client.cost import FlopModel, parameter_bytes, training_state_bytes
from fedtune.client.data import ClientData
from fedtune.client.forward_gradient import FwdStep, train_forward_gradient
from fedtune.client.forward_gradient import held_bytes as forward_held_bytes
from fedtune.client.joint_training import JointClient, train_jointly
from fedtune.client.local_training import DpSgdStep, LocalResult, train_locally
from fedtune.client.schedule import RoundSchedule
from fedtune.client.zeroth_order import ZoStep, direction_bytes, train_zeroth_order
from fedtune.config import TrainingConfig
from fedtune.config.privacy import DpSgdConfig
from fedtune.core import rng
from fedtune.data.tokenize import Collate, collate
from fedtune.losses import LossFn, example_loss_sum, token_loss_sum
from fedtune.models.head_loss import plain_head
from fedtune.reporting.console import bar_disabled


def round_plan(
    seed: int, round_index: int, client_id: int, num_examples: int, cfg: TrainingConfig, poisson: bool = False
) -> tuple[int, list[np.ndarray]]:
    """(torch seed, micro-batch index arrays) of one client's round: a pure function of its arguments.
    ``poisson``: DP-SGD's Poisson-sampled batches, one a step."""
    draws = rng.numpy_rng(rng.CLIENT_ROUND, seed, round_index, client_id)
    torch_seed = int(draws.integers(2**63 - 1))
    if poisson:
        assert cfg.local_steps is not None  # the config requires it with DP-SGD
        return torch_seed, poisson_batches(num_examples, cfg.batch_size, cfg.local_steps, draws)
    plan = micro_batches(num_examples, cfg.batch_size, cfg.grad_accum, draws, cfg.local_steps, cfg.local_epochs)
    return torch_seed, plan


@dataclass(frozen=True)
class TrainOutcome:
    result: LocalResult
    elapsed_s: float  # wall time of the round's training, batching included
    zo_steps: tuple[ZoStep, ...] = ()  # zeroth-order training: each step's (seed, g, lr), in order
    zo_choices: tuple[int, ...] = ()  # with candidate seeds: the index each step chose
    fwd_steps: tuple[FwdStep, ...] = ()  # forward-gradient training: each step's perturbation count


class LocalTrainer:
    """Trains the active adapter of ``adapter`` on one client's data for one round."""

    def __init__(
        self,
        training: TrainingConfig,
        total_rounds: int,
        seed: int,
        pad_id: int,
        progress: bool = False,
        dp_sgd: DpSgdConfig | None = None,
        collate: Collate = collate,
    ):
        """``dp_sgd``: train with DP-SGD (Poisson batches, per-example clipping, noise; ``train``'s noise_seed).
        ``collate``: how a micro-batch's sequences become tensors (``data.tokenize.collate_pairs``: pairs)."""
        self.cfg, self.total_rounds, self.seed, self.pad_id = training, total_rounds, seed, pad_id
        self.progress, self.dp_sgd, self.collate = progress, dp_sgd, collate
        self._cost_of: tuple = (None, None)

    def held_bytes(self, adapter: AdapterModel) -> int:
        """What a client holds through its round besides activations: the model's parameters, and the
        gradient and optimizer state of each trainable one (``client.cost``)."""
        if self.cfg.gradient == "zeroth_order":  # no gradient or optimizer state: one chunk of the direction
            return parameter_bytes(adapter.model.parameters()) + direction_bytes(list(adapter.params.values()))
        if self.cfg.gradient == "forward":  # the estimate's two half sums, the reference, one chunk of z
            return parameter_bytes(adapter.model.parameters()) + forward_held_bytes(list(adapter.params.values()))
        return parameter_bytes(adapter.model.parameters()) + training_state_bytes(
            adapter.params.values(), self.cfg.optimizer
        )

    def _cost(self, adapter: AdapterModel, fused: bool) -> FlopModel | None:
        if self._cost_of[0] is not adapter.model:  # the FLOP model of the model last trained
            self._cost_of = (adapter.model, FlopModel.of_model(adapter.model))
        cost = self._cost_of[1]
        return replace(cost, head_at_targets=True) if cost is not None and fused else cost

    def _forward_flops(
        self, adapter: AdapterModel, fused: bool, result: LocalResult, passes: Sequence[tuple[dict, int]]
    ) -> LocalResult:
        """``result`` with the analytic FLOPs of its forward passes: (batch, passes on it) per step run."""
        flops = self._inference_flops(adapter, fused, passes)
        return result if flops is None else replace(result, flops=flops)

    def _inference_flops(self, adapter: AdapterModel, fused: bool, passes: Sequence[tuple[dict, int]]) -> float | None:
        """The analytic FLOPs of forward passes without gradient, (batch, passes on it) each; None: unknown."""
        cost = self._cost(adapter, fused)
        return None if cost is None else float(sum(n * cost.inference(b) for b, n in passes))

    def _round(
        self, client_id: int, round_index: int, data: ClientData, poisson: bool = False
    ) -> tuple[int, list[dict[str, torch.Tensor]], int, Callable[[int], float]]:
        """(torch seed, micro-batches, optimizer steps, learning rate of each step) of one client's round."""
        cfg = self.cfg
        torch_seed, plan = round_plan(self.seed, round_index, client_id, len(data.train), cfg, poisson)
        batches = [self.collate([data.train[i] for i in idx], self.pad_id) if len(idx) else _empty() for idx in plan]
        steps = -(-len(batches) // cfg.grad_accum)
        schedule = RoundSchedule.of(cfg, self.total_rounds)
        return torch_seed, batches, steps, partial(schedule.lr_at, round_index, steps=steps)

    def train(
        self,
        adapter: AdapterModel,
        client_id: int,
        round_index: int,
        data: ClientData,
        corrections: Sequence[Correction] = (),
        loss: LossFn | None = None,
        noise_seed: int | None = None,
        candidates: Sequence[int] | None = None,
        reference: Mapping[str, torch.Tensor] | None = None,
        weights: Sequence[float] | None = None,
        prepare: Callable[[list[dict[str, torch.Tensor]]], list[dict[str, torch.Tensor]]] | None = None,
    ) -> TrainOutcome:
        """``loss``: next-token cross-entropy by default (fused as ``training.fused_loss`` says).
        ``noise_seed``: with DP-SGD, the client's secret seed of its noise (keyed further by round).
        ``candidates``: zeroth-order steps draw each direction's seed from these (FedKSeed), uniformly or with
        probabilities ``weights`` (FedKSeed-Pro).
        ``reference``: forward-gradient directions align with it, per adapter tensor (None: plain).
        ``prepare``: the round's micro-batches as ``loss`` needs them, made before the first step (DPO adds the
        reference model's log-probabilities); its forward passes count in the round's FLOPs."""
        cfg = self.cfg
        fused = loss is None and cfg.fused_loss and self.dp_sgd is None and plain_head(adapter.model) is not None
        if loss is None:
            loss = partial(token_loss_sum, fused=fused)
        start = time.perf_counter()
        dp = self.dp_sgd
        torch_seed, batches, steps, lr = self._round(client_id, round_index, data, poisson=dp is not None)
        step = None
        if dp is not None:
            if noise_seed is None:
                raise ValueError("DP-SGD needs the client's noise seed")
            g = rng.torch_generator(rng.DP_SGD_NOISE, noise_seed, round_index, client_id)
            step = DpSgdStep(dp.noise_multiplier, dp.max_grad_norm, min(cfg.batch_size, len(data.train)), g)
            loss = example_loss_sum
        bar = tqdm(
            total=steps, desc=f"  client {client_id}", leave=False, disable=bar_disabled(self.progress), unit="step"
        )
        if cfg.backprop_free and (corrections or step is not None):
            raise ValueError("training without backprop takes no corrections (FedProx, SCAFFOLD) and no DP-SGD")
        on_step = lambda _s, value: (bar.update(1), bar.set_postfix(loss=f"{value:.3f}"))  # noqa: E731
        names = sorted(adapter.params)  # the order directions are drawn in, tensor by tensor
        if cfg.gradient == "forward":
            result, fwd = train_forward_gradient(
                adapter.model,
                [adapter.params[k] for k in names],
                batches,
                lr,
                cfg.zo_eps,
                cfg.zo_clip,
                lambda s: (torch_seed + s) % 2**63,
                cfg.fwd_perturbations,
                cfg.fwd_variance,
                cfg.fwd_candidates,
                reference=None if reference is None else [reference[k] for k in names],
                on_step=on_step,
                loss=loss,
            )
            bar.close()
            ran = [(b, 2 * (f.perturbations + f.clipped)) for b, f in zip(batches, fwd, strict=False)]  # steps run
            result = self._forward_flops(adapter, fused, result, ran)
            return TrainOutcome(result, time.perf_counter() - start, fwd_steps=tuple(fwd))
        if cfg.gradient == "zeroth_order":
            if candidates is None:  # a fresh direction each step, a function of the round
                choices: list[int] = []
                seed_of = lambda s: (torch_seed + s) % 2**63  # noqa: E731
            else:
                draws = np.random.default_rng([torch_seed, 0x2D])
                if weights is None:
                    choices = draws.integers(0, len(candidates), len(batches)).tolist()
                else:
                    choices = draws.choice(len(candidates), size=len(batches), p=np.asarray(weights)).tolist()
                seed_of = lambda s: candidates[choices[s]]  # noqa: E731
            trained = train_zeroth_order(
                adapter.model,
                [adapter.params[k] for k in names],
                batches,
                lr,
                cfg.zo_eps,
                cfg.zo_clip,
                seed_of,
                on_step=on_step,
                loss=loss,
            )
            bar.close()
            n = len(trained.steps)
            result = self._forward_flops(adapter, fused, trained.result, [(b, 2) for b in batches[:n]])
            return TrainOutcome(result, time.perf_counter() - start, tuple(trained.steps), tuple(choices[:n]))
        prepared_flops = 0.0
        if prepare is not None:
            if cfg.backprop_free or step is not None:
                raise ValueError("prepared micro-batches train by backprop, without DP-SGD")
            batches = prepare(batches)
            prepared_flops = self._inference_flops(adapter, fused, [(b, 1) for b in batches]) or 0.0
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
                on_step=on_step,
                optimizer=cfg.optimizer,
                corrections=corrections,
                loss=loss,
                cost=self._cost(adapter, fused),
                dp=step,
            )
        bar.close()
        if prepared_flops:
            result = replace(result, flops=result.flops + prepared_flops)
        return TrainOutcome(result, time.perf_counter() - start)

    def train_jointly(
        self,
        adapter: AdapterModel,
        routing: RoutedLoRA,
        round_index: int,
        jobs: Sequence[tuple[int, ClientData, dict[str, torch.nn.Parameter], Sequence[Correction]]],
    ) -> list[TrainOutcome]:
        """Train several clients' rounds in one forward/backward a micro-batch (``client.joint_training``):
        each job is (client id, data, the leaves it trains from ``routing.leaves``, corrections). The joint
        wall time is shared out in proportion to each client's tokens, so the parts add up to it."""
        if self.dp_sgd is not None:
            raise ValueError("DP-SGD clips each example on its own: its clients train one at a time")
        cfg = self.cfg
        fused = cfg.fused_loss and plain_head(adapter.model) is not None
        start = time.perf_counter()
        clients, seeds, steps = [], [], 0
        for client_id, data, tensors, corrections in jobs:
            torch_seed, batches, own_steps, lr = self._round(client_id, round_index, data)
            clients.append(JointClient(tensors, batches, lr, corrections))
            seeds.append(torch_seed)
            steps = max(steps, own_steps)
        desc = "  clients " + ",".join(str(j[0]) for j in jobs)
        bar = tqdm(total=steps, desc=desc, leave=False, disable=bar_disabled(self.progress), unit="step")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds[0] if seeds else 0)  # nothing random runs (no dropout); kept for determinism
            results = train_jointly(
                adapter.model,
                routing,
                clients,
                cfg.grad_accum,
                self.pad_id,
                cfg.weight_decay,
                cfg.max_grad_norm,
                cfg.optimizer,
                fused,
                self._cost(adapter, fused),
                on_step=lambda _s: bar.update(1),
            )
        bar.close()
        elapsed = time.perf_counter() - start
        fed = sum(r.input_tokens for r in results)
        return [TrainOutcome(r, elapsed * (r.input_tokens / fed if fed else 1 / len(results))) for r in results]


def _empty() -> dict[str, torch.Tensor]:
    """A batch of no examples (DP-SGD's Poisson sampling can draw one)."""
    nothing = torch.zeros((0, 1), dtype=torch.long)
    return {"input_ids": nothing, "attention_mask": nothing.clone(), "labels": nothing.clone()}
