"""A causal LM cut into consecutive parts at block boundaries, for split learning (docs/algorithms/split.md).

A part runs the model's own modules on a range of its decoder blocks; the embeddings go with the first
part, the final norm and the LM head with the last. Between parts only hidden states (B, T, H) travel,
with the 2-D attention mask (B, T): each side rebuilds the causal mask and the positions (0..T-1,
as the unsplit model does for training) from it, and rotary models recompute their position
embeddings from those positions. Each part is called with the adapter tensors it owns substituted
in (``torch.func.functional_call``), so several clients' or copies' tensors can hold autograd graphs
over one shared base model at once.

Supported block layouts: ``models/blocks.py``'s ``LAYOUTS`` (Llama-family models and GPT-2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from fedtune.core.errors import ConfigError
from fedtune.core.types import Params
from fedtune.data.tokenize import IGNORE
from fedtune.models.blocks import causal_lm, layout_of


@dataclass(frozen=True)
class Cut:
    """Blocks [0, front) on the client with the embeddings; [front, L - back) on the server; the last
    ``back`` blocks with the final norm and LM head on the client (``u`` shape), or nothing more on the
    client and the head on the server (``vanilla``: back = 0)."""

    front: int
    back: int
    shape: str  # "u" or "vanilla"

    def check(self, layers: int) -> None:
        if self.shape not in ("u", "vanilla"):
            raise ConfigError(f"split.shape={self.shape!r}; allowed: u, vanilla")
        if self.shape == "vanilla" and self.back:
            raise ConfigError("split.client_back applies to split.shape=u only (vanilla keeps the head on the server)")
        if self.front < 1 or (self.shape == "u" and self.back < 1):
            raise ConfigError("split.client_front (and client_back with shape u) must be at least 1 block")
        if self.front + self.back >= layers:
            raise ConfigError(
                f"split.client_front={self.front} + split.client_back={self.back} leaves no block of the model's "
                f"{layers} for the server; cut at most {layers - 1} blocks to the client"
            )

    def side(self, block: int, layers: int) -> str:
        """ "client" or "server": who runs block ``block`` of ``layers``."""
        return "client" if block < self.front or block >= layers - self.back else "server"


class SplitModel:
    """One (peft-wrapped) causal LM, run part by part with given adapter tensors."""

    def __init__(self, model: nn.Module, cut: Cut):
        self.model, self.cut = model, cut
        self.layout = layout_of(model)
        self.lm = causal_lm(model)
        self.inner = getattr(self.lm, self.layout.inner)
        self.blocks: nn.ModuleList = getattr(self.inner, self.layout.blocks)
        self.layers = len(self.blocks)
        cut.check(self.layers)

    def block_of(self, name: str) -> int | None:
        m = self.layout.block_name.search(name)
        return int(m.group(1)) if m else None

    def partition(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(client names, server names) of adapter tensors, by the block each lives in; ConfigError for a
        tensor outside every block (prompt tuning, a trained head: they have no side)."""
        client, server = [], []
        for name in names:
            block = self.block_of(name)
            if block is None or block >= self.layers:
                raise ConfigError(
                    f"adapter tensor {name!r} is not inside a decoder block, so split learning cannot place it; "
                    "use an adapter that lives in the blocks (adapter.method lora, dora, ia3, bottleneck)"
                )
            (client if self.cut.side(block, self.layers) == "client" else server).append(name)
        return client, server

    def client_parameters(self) -> list[torch.Tensor]:
        """The base model's tensors the client holds: embeddings, its blocks and (shape u) norm and head."""
        modules = [getattr(self.inner, name) for name in self.layout.embeddings]
        modules += [b for i, b in enumerate(self.blocks) if self.cut.side(i, self.layers) == "client"]
        if self.cut.shape == "u":
            modules += [getattr(self.inner, self.layout.norm), self.lm.get_output_embeddings()]
        return [p for m in modules for p in m.parameters()]

    def client_blocks(self) -> tuple[range, range]:
        """(front, back) block ranges the client runs (back empty for vanilla)."""
        return range(self.cut.front), range(self.layers - self.cut.back, self.layers)

    # ---- the parts; ``params`` maps full parameter names (``named_parameters``) to the tensors to use

    def front(self, params: Params, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings and blocks [0, front): the hidden states (B, T, H) at the first cut."""
        return self._call(params, self._front, input_ids, attention_mask)

    def middle(self, params: Params, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The server's blocks [front, L - back): hidden states at the second cut (or at the last block)."""
        return self._call(params, self._blocks, hidden, attention_mask, self.cut.front, self.layers - self.cut.back)

    def back_loss(
        self, params: Params, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, int]:
        """Blocks [start, L), final norm, LM head and the summed next-token loss over target positions,
        computed exactly as ``losses.token_loss_sum`` does on the whole model; (sum, positions)."""
        return self._call(params, self._back_loss, hidden, attention_mask, labels, start)

    def _call(self, params: Params, fn: Callable, *args):
        return torch.func.functional_call(_Runner(self, fn), _prefixed(params), args, strict=False)

    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T): as the model does
        mask = create_causal_mask(
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=positions,
        )
        ctx = {"attention_mask": mask, "position_ids": positions}
        if self.layout.rotary:
            ctx["position_embeddings"] = self.inner.rotary_emb(hidden, position_ids=positions)
        return ctx

    def _front(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.layout.embed(self.inner, input_ids, positions)  # (B, T, H)
        return self._blocks(hidden, attention_mask, 0, self.cut.front)

    def _blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        ctx = self._context(hidden, attention_mask)
        for block in self.blocks[lo:hi]:
            hidden = self._run_block(block, hidden, ctx)
        return hidden

    def _run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        if self.layout.rotary:
            out = block(
                hidden,
                attention_mask=ctx["attention_mask"],
                position_ids=ctx["position_ids"],
                position_embeddings=ctx["position_embeddings"],
            )
        else:
            out = block(hidden, None, ctx["attention_mask"], position_ids=ctx["position_ids"])
        return out[0] if isinstance(out, tuple) else out

    def _back_loss(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, int]:
        hidden = self._blocks(hidden, attention_mask, start, self.layers)
        hidden = getattr(self.inner, self.layout.norm)(hidden)  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)  # (K,)
        logits = self.lm.get_output_embeddings()(hidden[:, keep, :]).float()  # (B, K, V)
        kept = targets[:, keep]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), kept.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return loss, int((kept != IGNORE).sum())


class _Runner(nn.Module):
    """The model as a submodule (so functional_call can substitute its tensors) and one part's code."""

    def __init__(self, split: SplitModel, fn: Callable):
        super().__init__()
        self.net, self._fn = split.model, fn

    def forward(self, *args):
        return self._fn(*args)


def _prefixed(params: Params) -> Params:
    return {f"net.{k}": v for k, v in params.items()}


def full_names(model: nn.Module, named: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """Adapter tensor name -> its full parameter name in ``model`` (peft inserts the adapter's own name)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {k: by_id[id(p)] for k, p in named.items()}
