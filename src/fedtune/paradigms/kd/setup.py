"""KD-FedLLM from a plan: the public set, the consensus server, and clients that may run their own models."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedtune.adapters.build import seeded_adapter
from fedtune.client.data import ClientData
from fedtune.client.trainer import LocalTrainer
from fedtune.core import rng
from fedtune.core.errors import ConfigError, RunError
from fedtune.core.types import Params
from fedtune.data.prepare import load_splits
from fedtune.evaluation.harness import EvalSet
from fedtune.models.loading import load_tokenizer
from fedtune.paradigms.kd.client import KDClient, KDClientSettings, Member
from fedtune.paradigms.kd.distill import DistillSettings, distil
from fedtune.paradigms.kd.distributions import TopK, id_dtype
from fedtune.paradigms.kd.public import build_public, overlap_with
from fedtune.paradigms.kd.server import KDSettings, KnowledgeDistillation
from fedtune.paradigms.plan import ParadigmPlan, Workbench

if TYPE_CHECKING:
    import torch

    from fedtune.adapters.adapter_model import AdapterModel
    from fedtune.aggregation.weighting import WeightCap
    from fedtune.paradigms.base import EvaluateAdapter
    from fedtune.paradigms.kd.settings import KDConfig

log = logging.getLogger("fedtune")


def vocab_size(adapter: AdapterModel) -> int:
    """Rows of the LM head: the vocabulary top-k ids index."""
    return int(adapter.model.get_output_embeddings().weight.shape[0])


def distill_settings(plan: ParadigmPlan) -> DistillSettings:
    kd, t = _kd(plan), plan.training
    lr = kd.distill_lr if kd.distill_lr is not None else t.lr
    return DistillSettings(
        kd.distill_steps, kd.distill_batch_size, lr, kd.temperature, t.max_grad_norm, t.optimizer, t.weight_decay
    )


def _kd(plan: ParadigmPlan) -> KDConfig:
    return plan.settings  # type: ignore[return-value]  (the plan of paradigm kd carries its settings)


def _check_k(plan: ParadigmPlan, vocab: int) -> int:
    """The consensus's k' (checked, like top_k, to leave a tail in the vocabulary)."""
    kd = _kd(plan)
    union = min(plan.clients_per_round * kd.top_k, vocab - 1)  # every token some client sent
    k_out = kd.consensus_top_k or (kd.top_k if kd.downlink == "logits" else union)
    for key, k in (("top_k", kd.top_k), ("consensus_top_k", k_out)):
        if k >= vocab:
            raise ConfigError(
                f"paradigm.{key}={k} must be below the vocabulary size {vocab} (the rest is the tail mass)"
            )
    return k_out


def _check_tokenizers(plan: ParadigmPlan, bench: Workbench) -> None:
    """Before any round: every client model must tokenize exactly as model.name does."""
    for name in dict.fromkeys(_kd(plan).client_models or []):
        if name != plan.model.name and load_tokenizer(name).get_vocab() != bench.tokenizer.get_vocab():
            raise ConfigError(_OTHER_TOKENIZER.format(name=name, model=plan.model.name))


_OTHER_TOKENIZER = (
    "paradigm.client_models: {name!r} does not share {model!r}'s tokenizer and vocabulary; "
    "KD exchanges token ids, so every client model needs the same tokenizer"
)


def server(
    plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap
) -> KnowledgeDistillation:
    kd = _kd(plan)
    _check_tokenizers(plan, bench)
    public = build_public(plan.data, bench.encoder, announce=True)
    if plan.data.public_dataset:  # the built-in public set is disjoint from evaluation by construction
        shared = overlap_with(public, load_splits(plan.data, plan.split_seed)[1])
        if shared:
            log.warning(
                "%d public examples have the prompt of an evaluation example: the eval loss then measures "
                "what the consensus taught on those very prompts; remove them from data.public_dataset",
                shared,
            )
    vocab = vocab_size(bench.adapter)
    k_down = _check_k(plan, vocab)
    settings = KDSettings(
        kd.downlink, kd.top_k, k_down, kd.public_slice, kd.weighting, plan.num_clients, vocab, plan.seed, weight_cap
    )
    log.info(
        "KD: top-%d of %d tokens (ids as %s) at each response position of %d public examples per round, "
        "weighting %s; down: %s%s",
        kd.top_k,
        vocab,
        str(id_dtype(vocab)).removeprefix("torch."),
        min(kd.public_slice, len(public)),
        kd.weighting,
        f"the consensus (top-{k_down}), distilled by each client into its own adapter"
        if kd.downlink == "logits"
        else f"the global adapter, distilled on the server from the consensus (top-{k_down})",
        f"; client models {kd.client_models}" if kd.client_models else "",
    )
    if kd.downlink == "logits":
        return KnowledgeDistillation(settings, public, {}, bench.uplink, bench.downlink)
    adapter, steps, pad = bench.adapter, distill_settings(plan), bench.tokenizer.pad_token_id

    def server_distil(params: Params, indices: torch.Tensor, teacher: TopK, r: int) -> tuple[Params, float]:
        adapter.activate(adapter.global_rank)
        adapter.load(params)
        result = distil(adapter, public, indices, teacher, steps, pad, rng.SERVER_DISTIL.key(plan.seed, r))
        if result.diverged:
            raise RunError(
                f"round {r}: server-side distillation diverged ({result.error}); the last checkpoint is intact. "
                "Lower kd.distill_lr and rerun with --resume"
            )
        return adapter.get_state(), result.mean_loss

    return KnowledgeDistillation(
        settings, public, bench.initial, bench.uplink, bench.downlink, evaluate_adapter, server_distil
    )


def client(
    plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None
) -> KDClient:
    kd = _kd(plan)
    public = build_public(plan.data, bench.encoder)
    vocab = vocab_size(bench.adapter)
    built = {plan.model.name: Member(bench.adapter, bench.initial)}
    names = list(kd.client_models or [plan.model.name])

    def member(name: str) -> Member:
        """The model ``name`` with its seeded adapter, loaded the first time a client that runs it is served."""
        if name not in built:
            other, tokenizer = seeded_adapter(plan.adapter_recipe(), name)
            if tokenizer.get_vocab() != bench.tokenizer.get_vocab() or vocab_size(other) != vocab:
                raise ConfigError(_OTHER_TOKENIZER.format(name=name, model=plan.model.name))
            built[name] = Member(other, other.get_state())
        return built[name]

    trainer = LocalTrainer(plan.training, plan.rounds, plan.seed, bench.tokenizer.pad_token_id, plan.progress)
    settings = KDClientSettings(kd.downlink, kd.top_k, kd.score_batch_size, vocab, plan.seed)
    return KDClient(
        member,
        lambda c: names[c % len(names)],
        bench.tokenizer,
        data,
        trainer,
        public,
        settings,
        distill_settings(plan),
        bench.eval_settings,
        bench.uplink,
        bench.downlink,
        eval_set,
    )
