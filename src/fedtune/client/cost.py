"""What a client's round costs it: memory for its part of the model, and floating-point operations.

Every paradigm reports the same three numbers per round (``metrics.jsonl``: ``client_s``,
``client_peak_bytes``, ``client_flops``), so paradigms can be compared on the client's side:

- **peak bytes** = the bytes of the parameters the client holds (the whole model in parameter
  sharing and KD; the embeddings, its blocks and, U-shaped, the head in split learning; the
  emulator in offsite-tuning), plus what training keeps per trainable tensor (its gradient and the
  optimizer's state: AdamW's two moments, nothing for plain SGD; ``training_state_bytes``), plus the
  most activation bytes autograd kept for the backward pass at once during a micro-batch. The
  activations are measured, not estimated: every tensor autograd saves is counted once by its
  storage (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded. Memory an operator
  allocates only while it runs is not counted.
- **FLOPs** are analytic: a forward pass costs 2 FLOPs per multiply-accumulate of each block's
  matrices for every token, plus causal attention (2·d·(T+1) per token and block, for T keys on
  average (T+1)/2), plus the LM head at the positions that are scored; training counts
  forward + backward as 3 forward passes (the usual convention; with a frozen base the weight
  gradients are skipped, so this is an upper bound).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedtune.data.tokenize import IGNORE
from fedtune.models.quantised import logical_numel


def parameter_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``params`` (tied weights counted once)."""
    seen: dict[int, int] = {}
    for p in params:
        storage = p.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


OPTIMIZER_SLOTS = {"adamw": 2, "sgd": 0}  # state tensors per trainable tensor (``local_training.make_optimizer``)


def training_state_bytes(params: Iterable[torch.Tensor], optimizer: str) -> int:
    """Bytes training keeps for ``params``: each one's gradient and the optimizer's state slots, each of its size."""
    return (1 + OPTIMIZER_SLOTS[optimizer]) * sum(p.numel() * p.element_size() for p in params)


class ActivationMeter:
    """The most bytes autograd holds for backward at once, over the forward passes run in ``measure()``."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self.peak = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Count what the forward passes inside keep for backward (one micro-batch, or one part of it)."""
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._params:
                kept[ptr] = storage.nbytes()
            # detached: a saved output packed as itself is a cycle through the graph that Python's collector
            # cannot see, so a graph dropped without backward (a split client's round cut short) would leak
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak = max(self.peak, sum(kept.values()))


@dataclass(frozen=True)
class FlopModel:
    """A causal LM's forward cost, from its own modules: matrix sizes per block, width, vocabulary."""

    block_macs: tuple[int, ...]  # multiply-accumulates per token of each block's matrices (weights of ndim 2)
    hidden: int
    head_macs: int  # per scored position: hidden x vocabulary
    recompute: bool = False  # gradient checkpointing: backward runs the blocks' forward once more
    head_at_targets: bool = False  # training's head runs at target positions only (the fused loss)

    @classmethod
    def of(cls, blocks: nn.ModuleList, hidden: int, vocab: int) -> FlopModel:
        macs = tuple(
            sum(logical_numel(p) for n, p in b.named_parameters() if p.ndim == 2 and "lora_" not in n) for b in blocks
        )
        return cls(macs, hidden, hidden * vocab)

    @classmethod
    def of_model(cls, model: nn.Module) -> FlopModel | None:
        """From a (peft-wrapped) causal LM of a known block layout (``models.blocks.LAYOUTS``); None otherwise."""
        from fedtune.models.activation_checkpointing import checkpoints_activations
        from fedtune.models.blocks import blocks_of

        found = blocks_of(model)
        if found is None:
            return None
        blocks, lm = found
        flops = cls.of(blocks, int(lm.config.hidden_size), int(lm.get_output_embeddings().weight.shape[0]))
        return replace(flops, recompute=checkpoints_activations(lm))

    def training(self, batch: dict[str, torch.Tensor]) -> float:
        """FLOPs of one training micro-batch through the whole model (the head where any row has a target,
        or at the targets alone with ``head_at_targets``); with gradient checkpointing, the blocks'
        forward once more (not the head's)."""
        b, t = batch["input_ids"].shape
        labels = batch["labels"]
        scored = int((labels[:, 1:] != IGNORE).sum()) if self.head_at_targets else scored_positions(labels)
        again = self.forward(range(len(self.block_macs)), b, t) if self.recompute else 0.0
        return TRAINING * self.forward(range(len(self.block_macs)), b, t, scored) + again

    def inference(self, batch: dict[str, torch.Tensor]) -> float:
        """FLOPs of one forward pass of a batch through the whole model (the head where any row has a target)."""
        b, t = batch["input_ids"].shape
        labels = batch.get("labels")
        scored = scored_positions(labels) if labels is not None else b * t
        return self.forward(range(len(self.block_macs)), b, t, scored)

    def forward(self, blocks: Iterable[int], batch: int, seq: int, scored: int = 0) -> float:
        """FLOPs of a forward pass through ``blocks`` for ``batch`` sequences of ``seq`` tokens, and the head
        at ``scored`` positions."""
        tokens = batch * seq
        per_token = sum(2 * self.block_macs[i] + 2 * self.hidden * (seq + 1) for i in blocks)
        return float(tokens * per_token + 2 * self.head_macs * scored)


TRAINING = 3.0  # forward + backward, in forward passes


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a micro-batch feeds the model: its non-padding positions (throughput's numerator)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def scored_positions(labels: torch.Tensor) -> int:
    """Positions the LM head runs at for labels (B, T): every row's, at each position any row has a target
    (``losses``' ``logits_to_keep``)."""
    return labels.shape[0] * int((labels[:, 1:] != IGNORE).any(dim=0).sum())
