"""Score continuations and generate from prompts, one forward per batch, sharing what the prompts share.

Every evaluation kind reduces to three questions about (prompt, continuation) rows: the log-likelihood
of the continuation (held-out loss, multiple choice by option), the next-token distribution at the
prompt's end (multiple choice by answer letter, label choice), and the greedy continuation (exact
match, answer extraction, ROUGE-L, code). ``score`` answers all three from one forward per batch.

Prompts start alike (a chat template's system turn, a task's instruction, a k-shot header). Rows are
sorted so that prompts sharing a prefix sit together; each batch is split into runs of rows
(``prefix_groups``: the split costing the fewest token positions), every run's shared prefix runs once
in one padded forward, and each row takes its run's attention cache. A row is then laid out as
``[run prefix][left padding][rest of prompt][continuation][right padding]``, so every prompt ends in the
same column: the forward's kept positions give the continuation's log-probabilities, the prompt-end
distribution and the greedy token after the prompt and after each continuation token. Position ids skip
the padding, so a row sees the positions it would see alone (the numbers of scoring each row alone up to
float summation order; tested).

Greedy text starts with the continuation as a draft that the forward has already checked (speculative
decoding's verification, with the reference answer as the draft): the greedy tokens are read off the
forward while they equal the continuation's, so a row whose answer the model reproduces, or that leaves it
hopelessly (``give_up``), needs no decoding step at all. Rows still going after that decode one token per
forward from the same attention cache, their unread continuation masked out, finished rows dropped.

Models whose adapter prepends virtual tokens or owns the attention cache (peft prompt learning) take
the plain path: right-padded rows for the likelihoods,
``generate`` from the left-padded prompts for the text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import DynamicCache, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from fedtune.adapters.adapter_model import virtual_token_offset
from fedtune.data.tokenize import IGNORE, left_pad
from fedtune.models.device import model_device
from fedtune.models.head_loss import head_bypassed, head_log_probs, plain_head


@dataclass(frozen=True)
class Scores:
    """Per row, in the order the rows were given."""

    log_likelihood: list[float]  # Σ_j log p(continuation_j | prompt, continuation_<j)
    tokens: list[int]  # continuation tokens scored
    choices: list[list[float]] | None  # log p(c | prompt) for each candidate token c, when asked
    generations: list[str] | None  # greedy continuation text, when asked


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt starts with, leaving each prompt at least one token."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def caches_prompts(model: torch.nn.Module) -> bool:
    """Whether the shared-prefix cache path applies: no peft prompt learning (virtual tokens, prefix tuning)."""
    return not (isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning)


@torch.no_grad()
def score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]] | None = None,
    *,
    batch_size: int,
    candidates: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    cache_prompts: bool = True,
    give_up: Callable[[int, str], bool] | None = None,
) -> Scores:
    """Log-likelihood of each continuation given its prompt (none given: empty), log-probabilities of the
    ``candidates`` token ids at each prompt's end, and ``max_new_tokens`` of greedy text from each prompt.
    ``cache_prompts`` False: the plain path even where the cached one applies (a separate forward and
    ``generate``, for comparison). ``give_up(row, text so far)``: True stops that row's generation."""
    model.eval()
    conts = [list(c) for c in continuations] if continuations is not None else [[] for _ in prompts]
    cached = cache_prompts and caches_prompts(model)
    if cached:  # rows sharing a prefix side by side
        order = sorted(range(len(prompts)), key=lambda i: (list(prompts[i]), conts[i]))
    else:  # rows of similar widths side by side
        order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(conts[i])))
    ll, n_tok = [0.0] * len(prompts), [0] * len(prompts)
    choices: list[list[float]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        batch = _Batch(model, tokenizer, [prompts[i] for i in rows], [conts[i] for i in rows], cached)
        row_ll, first = batch.likelihoods()
        want = torch.tensor(list(candidates), device=first.device) if candidates else None
        for k, i in enumerate(rows):
            ll[i], n_tok[i] = float(row_ll[k]), len(conts[i])
            if want is not None:
                choices[i] = first[k, want].tolist()
        if max_new_tokens:
            hopeless = None if give_up is None else (lambda k, text, rows=rows: give_up(rows[k], text))
            for k, text in enumerate(batch.generate(max_new_tokens, hopeless)):
                texts[rows[k]] = text
    return Scores(ll, n_tok, choices if candidates else None, texts if max_new_tokens else None)


def prefix_groups(prompts: Sequence[Sequence[int]], extra: int = 0) -> list[tuple[int, int, int]]:
    """Runs of consecutive (sorted) prompts and the prefix each run shares: [(start, stop, length)], chosen to
    cost the fewest token positions, G·max P (the runs' prefixes, one padded forward) + B·(max suffix + extra).
    Every prompt keeps at least one token outside its run's prefix."""
    n = len(prompts)
    lcp = [shared_prefix([prompts[i - 1], prompts[i]]) for i in range(1, n)]  # capped to leave a token each

    def runs(cut: int) -> list[tuple[int, int, int]]:
        out, start = [], 0
        for i in range(1, n + 1):
            if i == n or lcp[i - 1] < cut:
                out.append((start, i, shared_prefix(prompts[start:i]) if i - start > 1 else len(prompts[start]) - 1))
                start = i
        return out

    def cost(groups: list[tuple[int, int, int]]) -> int:
        widest = max(len(prompts[i]) - length for a, b, length in groups for i in range(a, b))
        return len(groups) * max(length for *_, length in groups) + n * (widest + extra)

    options = [runs(cut) for cut in sorted({0, *lcp, max(lcp, default=0) + 1})]
    return min(options, key=cost)


class _Batch:
    """One batch of rows: the forward over their prompts and continuations, then (maybe) generation."""

    def __init__(self, model, tokenizer, prompts, conts, cached: bool):
        self.model, self.tokenizer, self.prompts, self.cached = model, tokenizer, prompts, cached
        self.pad, self.device = tokenizer.pad_token_id, model_device(model)
        self.cache: DynamicCache | None = None
        b, c = len(prompts), max(1, max(len(x) for x in conts))
        if cached:  # [group prefix][left pad][rest of prompt][continuation][right pad]: prompts end at one column
            groups = prefix_groups(prompts, c)
            self.group_of = [g for g, (start, stop, _) in enumerate(groups) for _ in range(start, stop)]
            self.heads = [list(prompts[start][:length]) for start, _, length in groups]  # each group's prefix
            p = max(len(h) for h in self.heads)
            rests = [pr[len(self.heads[g]) :] for pr, g in zip(prompts, self.group_of, strict=True)]
            w = max(len(r) for r in rests)
            ids = torch.full((b, w + c), self.pad, dtype=torch.long)  # (B, W + C): the prefixes are in the cache
            mask = torch.zeros((b, p + w + c), dtype=torch.long)  # (B, P + W + C)
            ends = torch.full((b,), w - 1)  # (B,) column (of ids) of each prompt's last token
            for i, (rest, co) in enumerate(zip(rests, conts, strict=True)):
                mask[i, p - len(self.heads[self.group_of[i]]) : p] = 1
                ids[i, w - len(rest) : w] = torch.tensor(rest, dtype=torch.long)
                ids[i, w : w + len(co)] = torch.tensor(co, dtype=torch.long)
                mask[i, p + w - len(rest) : p + w + len(co)] = 1
            self.p, self.width = p, w
        else:  # [prompt][continuation][right pad]
            t = max(len(pr) + len(co) for pr, co in zip(prompts, conts, strict=True))
            ids = torch.full((b, t), self.pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((b, t), dtype=torch.long)
            ends = torch.tensor([len(pr) - 1 for pr in prompts])
            for i, (pr, co) in enumerate(zip(prompts, conts, strict=True)):
                ids[i, : len(pr) + len(co)] = torch.tensor([*pr, *co])
                mask[i, : len(pr) + len(co)] = 1
        self.ids, self.mask, self.ends, self.conts, self.c = ids, mask, ends, conts, c

    def likelihoods(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ log p of each row's continuation (B,), log-probs at each prompt's end (B, V)); keeps, per row,
        the greedy token at the prompt's end and after each continuation token (``self.greedy``)."""
        lo = int(self.ends.min())
        stop = min(int(self.ends.max()) + self.c + 1, self.ids.shape[1])  # through each row's last token
        keep = torch.arange(lo, stop)  # (K,) positions that predict what we score or read greedily
        kwargs = {"attention_mask": self.mask.to(self.device)}
        if self.cached:
            positions = (self.mask.cumsum(1) - 1).clamp(min=0)[:, self.p :]  # (B, W + C): padding skipped
            self.cache = DynamicCache()
            if self.p:  # every group's prefix in one forward (G, P), then each row takes its group's cache
                heads, head_mask = left_pad(self.heads, self.pad)  # (G, P) each
                head_pos = (head_mask.cumsum(1) - 1).clamp(min=0)
                self.model(
                    input_ids=heads.to(self.device),
                    attention_mask=head_mask.to(self.device),
                    position_ids=head_pos.to(self.device),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.cache.batch_select_indices(torch.tensor(self.group_of, device=self.device))
            kwargs |= {"position_ids": positions.to(self.device), "cache": self.cache, "use_cache": True}
        offset = virtual_token_offset(self.model)
        head = plain_head(self.model)
        ids = self.ids.to(self.device)
        with head_bypassed(head) if head is not None else contextlib.nullcontext():
            out = self.model(input_ids=ids, logits_to_keep=(keep + offset).to(self.device), **kwargs).logits
        # out: (B, K, H) hidden states (plain head) or (B, K, V) logits
        first = (self.ends - lo).tolist()  # row i's prompt end is kept position first[i]
        labels = torch.full(out.shape[:2], IGNORE, dtype=torch.long)  # (B, K): token predicted at each kept position
        read = torch.zeros(out.shape[:2], dtype=torch.bool)  # (B, K): the prompt's end and each continuation token
        for i, co in enumerate(self.conts):
            labels[i, first[i] : first[i] + len(co)] = torch.tensor(co, dtype=torch.long)
            read[i, first[i] : first[i] + len(co) + 1] = True
        labels, read = labels.to(out.device), read.to(out.device)
        if head is not None:
            tok_lp, top = head_log_probs(out[read], head, labels[read])  # (R,) each
        else:
            log_probs = torch.log_softmax(out[read].float(), dim=-1)  # (R, V)
            tok_lp = log_probs.gather(1, labels[read].clamp(min=0)[:, None])[:, 0].masked_fill(labels[read] < 0, 0.0)
            top = log_probs.argmax(1)
        per_row = torch.zeros(out.shape[:2], dtype=tok_lp.dtype, device=out.device)  # (B, K)
        per_row[read] = tok_lp
        greedy = torch.full(out.shape[:2], -1, dtype=torch.long, device=out.device)  # (B, K)
        greedy[read] = top
        self.greedy = [greedy[i, first[i] : first[i] + len(co) + 1].tolist() for i, co in enumerate(self.conts)]
        rows = torch.arange(len(first), device=out.device)
        at_end = out[rows, torch.tensor(first, device=out.device)]  # (B, H) or (B, V)
        end_lp = torch.log_softmax((head(at_end) if head is not None else at_end).float(), dim=-1)  # (B, V)
        return per_row.sum(1).cpu(), end_lp.cpu()

    def generate(self, max_new_tokens: int, give_up: Callable[[int, str], bool] | None = None) -> list[str]:
        """Greedy text after each prompt. The cached path reads it off the forward while it follows the row's
        continuation (a draft that forward verified) and decodes from its attention cache only after that."""
        if self.cached:
            return self._decode(max_new_tokens, give_up)
        tok = self.tokenizer
        (ids, mask), extra = left_pad(self.prompts, self.pad), {}  # (B, T) each
        if give_up is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([_GiveUp(tok, ids.shape[1], give_up)])
        gen = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
            eos_token_id=tok.eos_token_id,
            use_cache=True,
            **extra,
        )
        return tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)

    def _decode(self, max_new_tokens: int, give_up: Callable[[int, str], bool] | None) -> list[str]:
        """Greedy tokens per row: those the forward gave while they matched the continuation, then one
        forward per step over the rows still going, each row's unmatched continuation masked out."""
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        made: list[list[int]] = [[] for _ in self.conts]

        def ends(i: int) -> bool:  # after row i's newest token: is its text finished?
            t = made[i]
            return (
                t[-1] == eos
                or len(t) >= max_new_tokens
                or (give_up is not None and give_up(i, tok.decode(t, skip_special_tokens=True)))
            )

        going, mask = [], self.mask.clone()  # (B, P + W + C)
        for i, co in enumerate(self.conts):
            for j, g in enumerate(self.greedy[i]):  # g: the greedy token after the prompt and co[:j]
                made[i].append(g)
                if ends(i):
                    break
                if j == len(co) or g != co[j]:  # the continuation leaves the greedy path: decode from here
                    mask[i, self.p + self.width + j :] = 0  # co[j:] and padding unseen
                    going.append(i)
                    break
        if going:
            rows = torch.tensor(going)
            self.cache.batch_select_indices(rows.to(self.device))
            mask = mask[rows].to(self.device)  # (A, P + W + C)
            pos = mask.sum(1)  # (A,) each row's next position
            while going:
                mask = torch.cat([mask, mask.new_ones(len(going), 1)], dim=1)
                nxt = torch.tensor([made[i][-1] for i in going], device=self.device)[:, None]  # (A, 1)
                logits = self.model(
                    input_ids=nxt,
                    attention_mask=mask,
                    position_ids=pos[:, None],
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]  # (A, V)
                for i, g in zip(going, logits.argmax(-1).tolist(), strict=True):
                    made[i].append(g)
                still = [k for k, i in enumerate(going) if not ends(i)]
                if len(still) < len(going):
                    keep = torch.tensor(still, dtype=torch.long, device=self.device)
                    self.cache.batch_select_indices(keep)
                    mask, pos = mask[keep], pos[keep]
                    going = [going[k] for k in still]
                pos = pos + 1
        self.cache = None
        return [tok.decode(t, skip_special_tokens=True) for t in made]


class _GiveUp(StoppingCriteria):
    """Stops each row whose text so far ``give_up`` rejects (generate pads a stopped row from then on)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, start: int, give_up: Callable[[int, str], bool]):
        self.tokenizer, self.start, self.give_up = tokenizer, start, give_up

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)  # (B,) so far
        return torch.tensor([self.give_up(k, t) for k, t in enumerate(texts)], device=input_ids.device)
