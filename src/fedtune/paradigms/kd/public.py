"""The public set every party may see: where it comes from, its response positions, each round's slice.

By default the built-in generator makes it (prompts of the built-in task families, disjoint from
training and evaluation problems); ``data.public_dataset`` names a local file in any supported
format instead. Its responses are teacher-forcing context only: the loss is always the KL to the
consensus, never cross-entropy on them. Server and clients encode it the same way (response-only
positions), and the server sends a fingerprint with every request so that a client holding a
different public set refuses rather than scores the wrong text.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedtune.config.data import DataConfig
from fedtune.core import rng
from fedtune.core.errors import DataError
from fedtune.data.formats import Example
from fedtune.data.prepare import public_examples
from fedtune.data.tokenize import Encoded, Encoder, collate

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class PublicSet:
    examples: list[Example]
    encoded: list[Encoded]
    source: str
    digest: str  # sha256 of the token ids: both ends must hold the same set

    def __len__(self) -> int:
        return len(self.encoded)

    def positions(self, indices: torch.Tensor) -> int:
        """Response positions (rows of a top-k message) of these examples."""
        return sum(self.encoded[int(i)].num_target_tokens for i in indices)

    def offsets(self, indices: torch.Tensor) -> list[int]:
        """Row where each example's positions start in a message about ``indices``, plus the end."""
        out = [0]
        for i in indices:
            out.append(out[-1] + self.encoded[int(i)].num_target_tokens)
        return out

    def batch(self, indices, pad_id: int) -> dict[str, torch.Tensor]:
        return collate([self.encoded[int(i)] for i in indices], pad_id)

    def check(self, indices: torch.Tensor) -> None:
        """ValueError unless ``indices`` are distinct in-range public indices."""
        if indices.ndim != 1 or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"public indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise ValueError(f"public indices outside 0..{len(self) - 1}")
        if len(set(indices.tolist())) != len(indices):
            raise ValueError("repeated public indices")


def build_public(data: DataConfig, encoder: Encoder, announce: bool = False) -> PublicSet:
    examples, source = public_examples(data, "paradigm kd")
    encoded, n_trunc = replace(encoder, train_on_prompt=False).encode_all(examples)  # response positions only
    empty = [i for i, e in enumerate(encoded) if e.prompt_len < 1]
    if empty:  # position t predicts token t+1: a response needs a prompt token before it
        raise DataError(f"{source}: public examples {empty[:5]} render to an empty prompt; give each a prompt")
    h = hashlib.sha256()
    for e in encoded:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.int64(e.prompt_len).tobytes())
    public = PublicSet(examples, encoded, source, h.hexdigest()[:16])
    if announce:
        log.info(
            "public set: %d examples, %d response positions, from %s%s",
            len(public),
            sum(e.num_target_tokens for e in encoded),
            source,
            f" ({n_trunc} truncated to data.max_seq_len)" if n_trunc else "",
        )
    return public


def round_slice(seed: int, round_index: int, size: int, n: int) -> torch.Tensor:
    """The public examples scored in a round: ``size`` distinct indices, seeded by (seed, round), sorted."""
    draws = rng.numpy_rng(rng.PUBLIC_SLICE, seed, round_index)
    return torch.from_numpy(np.sort(draws.choice(n, size=min(size, n), replace=False))).to(torch.int32)


def overlap_with(public: PublicSet, others: list[Example]) -> int:
    """How many public examples share their prompt with one of ``others`` (e.g. the evaluation set)."""
    prompts = {tuple((m["role"], m["content"]) for m in ex.prompt_messages) for ex in others}
    return sum(tuple((m["role"], m["content"]) for m in ex.prompt_messages) in prompts for ex in public.examples)
