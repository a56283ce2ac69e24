"""Parameter sharing from a config: the aggregator and links on the server, the training client."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.routed_lora import RoutedLoRA
from fedtune.aggregation import build_aggregator
from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.client.schedule import RoundSchedule
from fedtune.client.trainer import LocalTrainer
from fedtune.errors import ConfigError
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.paradigms.parameter_sharing.secure_server import SecureAggregation
from fedtune.paradigms.parameter_sharing.server import ParameterSharing, SharingSettings
from fedtune.privacy.accounting import SampleLevel
from fedtune.privacy.dp import DpFedAvg
from fedtune.privacy.plan import PrivacyPlan, plan_privacy
from fedtune.privacy.secagg import FixedPoint
from fedtune.runtime import joint_count
from fedtune.types import Params

if TYPE_CHECKING:
    from fedtune.assembly import Workbench
    from fedtune.config import ExperimentConfig

log = logging.getLogger("fedtune")


def server(cfg: ExperimentConfig, bench: Workbench, evaluate_adapter, weight_cap: WeightCap) -> ParameterSharing:
    lora_mode = cfg.aggregation.lora_mode() if cfg.adapter.is_lora() else None
    n = cfg.partition.num_clients
    lower = {c: r for c in range(n) if (r := cfg.adapter.rank_of_client(c)) != cfg.adapter.r}
    lora_alpha = cfg.adapter.alpha if cfg.adapter.is_lora() else None  # LoRA-aware aggregation for LoRA only
    # with downlink updates clients hold the previous factors, so exact mode must not re-parametrise them
    align = cfg.compression.downlink_updates
    plan = plan_privacy(cfg)
    if plan is not None:
        aggregator = plan.aggregator(cfg.aggregation, lora_alpha, cfg.privacy.noise_seed)
    else:
        aggregator = build_aggregator(cfg.aggregation, n, lora_alpha, lower or None, align)
    secure = _secure_aggregation(cfg, plan, aggregator)
    log.info(
        "aggregation: %s%s%s",
        aggregator.name,
        f", LoRA {lora_mode}" if lora_mode else f", {cfg.adapter.method} tensors as they are",
        f", client ranks {lower}" if lower else "",
    )
    if lora_mode == "naive":
        log.warning(
            "aggregation.lora=naive averages LoRA A and B separately, which is inexact; "
            "metrics.jsonl reports the relative error per round as lora_factor_averaging_error"
        )
    agg = cfg.aggregation
    schedule = RoundSchedule.of(cfg.training, cfg.federation.rounds)
    dp = cfg.privacy.dp_sgd
    sample_level = None
    if dp is not None:
        assert cfg.training.local_steps is not None  # the config requires it with DP-SGD
        sample_level = SampleLevel(
            dp.noise_multiplier, cfg.training.batch_size, cfg.training.local_steps, dp.delta, dp.accountant
        )
        log.info(
            "DP-SGD in every client: examples Poisson-sampled at batch_size %d / the client's examples, each one's "
            "gradient clipped to %g, noise std %g x that; each client's epsilon at delta %g in metrics.jsonl",
            cfg.training.batch_size,
            dp.max_grad_norm,
            dp.noise_multiplier,
            dp.delta,
        )
    settings = SharingSettings(
        n,
        cfg.seed,
        agg.weighting,
        agg.max_update_norm,
        cfg.compression.downlink_updates,
        weight_cap,
        schedule,
        sample_level,
    )
    return ParameterSharing(aggregator, settings, bench.initial, bench.uplink, bench.downlink, evaluate_adapter, secure)


def _secure_aggregation(
    cfg: ExperimentConfig, plan: PrivacyPlan | None, aggregator: Aggregator
) -> SecureAggregation | None:
    """Secure aggregation's settings, and how ``aggregator`` takes the round's sum (None when off)."""
    sec = cfg.privacy.secure_aggregation
    if sec is None:
        return None
    z = plan.mechanism.noise_multiplier if plan is not None else 0.0
    c = plan.clip_norm if plan is not None else 0.0
    value_range = sec.range if sec.range is not None else (c * (1 + 8 * z) if plan is not None else 1.0)
    fp = FixedPoint.fit(value_range, sec.precision_bits, cfg.partition.num_clients)
    distributed = cfg.privacy.client_dp == "distributed"
    if isinstance(aggregator, DpFedAvg):
        dp = aggregator

        def absorb(params: Params, total: Params, count: int, state):
            return dp.aggregate_sum(params, total, state, add_noise=not distributed)
    else:

        def absorb(params: Params, total: Params, count: int, state):
            if count == 0:
                return params, state
            mean = {k: v / count for k, v in total.items()}
            return aggregator.aggregate(params, [Contribution(-1, mean, 1.0)], state)

    log.info(
        "secure aggregation: threshold %.2f of each round's clients (at least 2), values in +-%g at %d fractional "
        "bits mod 2^%d%s",
        sec.threshold,
        fp.range,
        fp.bits,
        fp.modulus_bits,
        ", DP noise added by the clients in shares" if distributed else "",
    )
    seed = cfg.privacy.noise_seed
    noise_seed = -1 if seed is None else seed % 2**52  # a float in the request keeps 52 bits exactly
    return SecureAggregation(sec.threshold, fp, c, z * c if distributed else 0.0, noise_seed, absorb)


def client(
    cfg: ExperimentConfig, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None
) -> ParameterSharingClient:
    trainer = LocalTrainer(
        cfg.training,
        cfg.federation.rounds,
        cfg.seed,
        bench.tokenizer.pad_token_id,
        cfg.output.progress,
        cfg.privacy.dp_sgd,
    )
    return ParameterSharingClient(
        bench.adapter,
        bench.tokenizer,
        data,
        trainer,
        cfg.seed,
        bench.eval_settings,
        bench.uplink,
        bench.downlink,
        bench.initial,
        cfg.training.proximal_mu,
        eval_set,
        cfg.privacy.noise_seed,
        joint_routing(cfg, bench.adapter),
    )


def joint_routing(cfg: ExperimentConfig, adapter: AdapterModel) -> RoutedLoRA | None:
    """The routing of joint training over this adapter when runtime.joint_clients asks for it (auto, where the
    model allows; a number, or a ConfigError saying why it cannot be)."""
    if joint_count(cfg) < 2:
        return None
    try:
        return RoutedLoRA(adapter)
    except ValueError as exc:
        if cfg.runtime.joint_clients == "auto":
            log.info("clients train one at a time: %s", exc)
            return None
        raise ConfigError(f"runtime.joint_clients: {exc}; remove it") from None
