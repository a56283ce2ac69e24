"""FedKSeed, client side: rebuild the global weights from the steps sent, train by zeroth-order steps along
candidate seeds, send one amount per candidate index used.

The process keeps the global weights of the latest round it rebuilt (every client it serves starts a
round from the same global weights), so steps are sent once per process rather than per client; a
request whose steps start after what the process holds is answered ``behind`` with the round it holds,
and the server sends the missing steps. Rebuilt weights that do not match the request's digest (another
torch build or CPU drawing other directions) fail the client's round with the reason, and the process
starts again from the initial adapter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.client.data import ClientData
from fedtune.client.trainer import LocalTrainer
from fedtune.client.zeroth_order import replay_
from fedtune.core.types import ClientState, Params
from fedtune.paradigms.fedkseed.messages import KSeedReply, KSeedRequest
from fedtune.paradigms.fedkseed.steps import Amplitudes, digest, ordered, pairs


class FedKSeedClient:
    serves = (KSeedRequest,)

    def __init__(
        self,
        adapter: AdapterModel,
        data: dict[int, ClientData],
        trainer: LocalTrainer,
        initial: Params,
        candidates: list[int],
        importance: bool = False,
    ):
        """``importance``: FedKSeed-Pro's sampling of candidates (``steps.Amplitudes``) instead of uniform."""
        self.adapter, self.data, self.trainer, self.candidates = adapter, data, trainer, candidates
        self.importance = importance
        self.initial = {k: v.detach().clone() for k, v in initial.items()}
        self._restart()

    def _restart(self) -> None:
        """Hold the initial weights again (round 0), with no steps counted."""
        self.held_round, self.held = 0, {k: v.clone() for k, v in self.initial.items()}  # this process's
        self.amplitudes = Amplitudes(len(self.candidates))  # of the steps replayed into ``held``

    def serve(self, client_id: int, request: Any, state: ClientState) -> tuple[KSeedReply, ClientState]:
        if not isinstance(request, KSeedRequest):
            raise TypeError(f"fedkseed client cannot serve {type(request).__name__}")
        return self.train(client_id, request), state

    def _catch_up(self, req: KSeedRequest) -> str | None:
        """Bring the held weights to round ``req.round - 1`` with the request's steps; the error, or None."""
        counts = [int(c) for c in req.counts.tolist()]
        if len(counts) != req.round - 1 - req.since or req.index.numel() != sum(counts) or min(counts, default=0) < 0:
            return "the steps sent do not cover rounds since+1 .. round-1"
        if req.index.dtype != torch.int32 or req.amount.dtype != torch.float32 or req.counts.dtype != torch.int32:
            return "the steps sent are not int32 counts and indices and float32 amounts"
        if (
            req.index.dim() != 1
            or req.index.numel() != req.amount.numel()
            or not bool(torch.isfinite(req.amount).all())
        ):
            return "the steps sent are malformed"
        if req.index.numel() and (int(req.index.min()) < 0 or int(req.index.max()) >= len(self.candidates)):
            return "a step's candidate index is out of range"
        skip = sum(counts[: self.held_round - req.since])  # steps of rounds this process applied already
        replay_(ordered(self.held), pairs(req.index[skip:], req.amount[skip:], self.candidates))
        self.amplitudes.add(req.index[skip:], req.amount[skip:])
        self.held_round = req.round - 1
        if digest(self.held) != req.digest:
            self._restart()
            return "the weights rebuilt from the steps differ from the server's (digest mismatch)"
        return None

    def train(self, client_id: int, req: KSeedRequest) -> KSeedReply:
        if not req.since <= self.held_round <= req.round - 1:
            if self.held_round > req.round - 1:  # a later round than asked for: start again from the beginning
                self._restart()
            if self.held_round < req.since:
                return KSeedReply(req.round, status="behind", holds=self.held_round)
        error = self._catch_up(req)
        if error is not None:
            return KSeedReply(req.round, status="diverged", error=error)
        self.adapter.set_state(self.held)
        data = self.data[client_id]
        weights = self.amplitudes.probabilities() if self.importance else None
        out = self.trainer.train(self.adapter, client_id, req.round, data, candidates=self.candidates, weights=weights)
        if out.result.diverged:
            return KSeedReply(req.round, status="diverged", error=out.result.error)
        amounts: dict[int, float] = defaultdict(float)
        for choice, step in zip(out.zo_choices, out.zo_steps, strict=True):
            if not step.skipped:
                amounts[choice] += step.lr * step.projected
        index = sorted(j for j, a in amounts.items() if a != 0.0 and math.isfinite(a))
        return KSeedReply(
            req.round,
            torch.tensor(index, dtype=torch.int32),
            torch.tensor([amounts[j] for j in index], dtype=torch.float32),
            num_examples=len(data.train),
            num_tokens=data.num_tokens,
            steps=out.result.steps,
            train_loss=out.result.mean_loss,
            local_train_s=out.result.train_s,
            peak_bytes=self.trainer.held_bytes(self.adapter) + out.result.peak_activation_bytes,
            flops=out.result.flops,
            trained_tokens=out.result.input_tokens,
        )
