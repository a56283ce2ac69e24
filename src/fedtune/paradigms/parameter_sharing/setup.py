"""Parameter sharing from a plan: the aggregator and links on the server, the training client."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fedtune.adapters.routed_lora import RoutedLoRA
from fedtune.aggregation import build_aggregator
from fedtune.aggregation.pipeline import Pipeline
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.client.schedule import RoundSchedule
from fedtune.client.trainer import LocalTrainer
from fedtune.core.errors import ConfigError
from fedtune.data.tokenize import Collate, collate
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.paradigms.parameter_sharing.secure_server import SecureAggregation
from fedtune.paradigms.parameter_sharing.server import ParameterSharing, SharingSettings
from fedtune.paradigms.plan import ParadigmPlan, Workbench
from fedtune.privacy.accounting import SampleLevel
from fedtune.privacy.secagg import FixedPoint

if TYPE_CHECKING:
    from fedtune.aggregation.base import Aggregator
    from fedtune.paradigms.base import EvaluateAdapter

log = logging.getLogger("fedtune")


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap):
    adapter, agg = plan.adapter, plan.aggregation
    lora_mode = agg.lora_mode() if adapter.is_lora() else None
    n = plan.num_clients
    lower = {c: r for c in range(n) if (r := adapter.rank_of_client(c)) != adapter.r}
    lora_alpha = adapter.alpha if adapter.is_lora() else None  # LoRA-aware aggregation for LoRA only
    # with downlink updates clients hold the previous factors, so exact mode must not re-parametrise them
    align = plan.compression.downlink_updates
    dp = plan.privacy_plan
    mean = dp.mean(plan.privacy.noise_seed) if dp is not None else None
    aggregator = build_aggregator(agg, n, lora_alpha, lower or None, align, mean=mean, seed=plan.seed)
    secure = _secure_aggregation(plan, aggregator)
    log.info(
        "aggregation: %s%s%s",
        aggregator.name,
        f", LoRA {lora_mode}" if lora_mode else f", {adapter.method} tensors as they are",
        f", client ranks {lower}" if lower else "",
    )
    if lora_mode == "naive":
        log.warning(
            "aggregation.lora=naive averages LoRA A and B separately, which is inexact; "
            "metrics.jsonl reports the relative error per round as lora_factor_averaging_error"
        )
    t = plan.training
    sample_level = None
    if plan.privacy.dp_sgd is not None:
        sgd = plan.privacy.dp_sgd
        assert t.local_steps is not None  # the config requires it with DP-SGD
        sample_level = SampleLevel(sgd.noise_multiplier, t.batch_size, t.local_steps, sgd.delta, sgd.accountant)
        log.info(
            "DP-SGD in every client: examples Poisson-sampled at batch_size %d / the client's examples, each one's "
            "gradient clipped to %g, noise std %g x that; each client's epsilon at delta %g in metrics.jsonl",
            t.batch_size,
            sgd.max_grad_norm,
            sgd.noise_multiplier,
            sgd.delta,
        )
    settings = SharingSettings(
        n,
        plan.seed,
        agg.weighting,
        plan.update_bound(weight_cap.max_examples, bench.initial),
        plan.compression.downlink_updates,
        weight_cap,
        RoundSchedule.of(t, plan.rounds),
        sample_level,
        dp,
    )
    return ParameterSharing(aggregator, settings, bench.initial, bench.uplink, bench.downlink, evaluate_adapter, secure)


def _secure_aggregation(plan: ParadigmPlan, aggregator: Aggregator) -> SecureAggregation | None:
    """Secure aggregation's settings (None when off); the aggregator then takes each round's sum."""
    sec = plan.privacy.secure_aggregation
    if sec is None:
        return None
    if not isinstance(aggregator, Pipeline):
        raise ConfigError(f"secure aggregation needs an aggregator that takes a sum; {aggregator.name} does not")
    dp = plan.privacy_plan
    z = dp.mechanism.noise_multiplier if dp is not None else 0.0
    c = dp.clip_norm if dp is not None else 0.0
    value_range = sec.range if sec.range is not None else (c * (1 + 8 * z) if dp is not None else 1.0)
    fp = FixedPoint.fit(value_range, sec.precision_bits, plan.num_clients)
    distributed = plan.privacy.client_dp == "distributed"
    log.info(
        "secure aggregation: threshold %.2f of each round's clients (at least 2), values in +-%g at %d fractional "
        "bits mod 2^%d%s",
        sec.threshold,
        fp.range,
        fp.bits,
        fp.modulus_bits,
        ", DP noise added by the clients in shares" if distributed else "",
    )
    seed = plan.privacy.noise_seed
    noise_seed = -1 if seed is None else seed % 2**52  # a float in the request keeps 52 bits exactly
    return SecureAggregation(sec.threshold, fp, c, z * c if distributed else 0.0, noise_seed)


def client(
    plan: ParadigmPlan,
    bench: Workbench,
    data: dict[int, ClientData],
    eval_set: EvalSet | None = None,
    kind: type[ParameterSharingClient] = ParameterSharingClient,
    collate: Collate = collate,
    **extra: Any,
) -> ParameterSharingClient:
    """The training client; ``kind`` and ``extra``: a paradigm that extends it builds its own subclass;
    ``collate``: how its micro-batches are made (``data.tokenize.collate_pairs``: preference pairs)."""
    trainer = LocalTrainer(
        plan.training, plan.rounds, plan.seed, bench.tokenizer.pad_token_id, plan.progress, plan.privacy.dp_sgd, collate
    )
    return kind(
        bench.adapter,
        bench.tokenizer,
        data,
        trainer,
        plan.seed,
        bench.eval_settings,
        bench.uplink,
        bench.downlink,
        bench.initial,
        plan.training.proximal_mu,
        eval_set,
        plan.privacy.noise_seed,
        _joint_routing(plan, bench),
        **extra,
    )


def _joint_routing(plan: ParadigmPlan, bench: Workbench) -> RoutedLoRA | None:
    """The routing of joint training over this adapter when placement asks for it (auto, where the model
    allows; a number, or a ConfigError saying why it cannot be)."""
    if plan.placement.joint < 2:
        return None
    try:
        return RoutedLoRA(bench.adapter)
    except ValueError as exc:
        if not plan.placement.joint_asked:
            log.info("clients train one at a time: %s", exc)
            return None
        raise ConfigError(f"runtime.joint_clients: {exc}; remove it") from None
