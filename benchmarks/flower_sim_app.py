"""A FlowerTune-style Flower app for benchmarks/runtimes.py: every client call builds its own model.

It trains with fedtune's local-training code and data so that only the framework differs; the
job's config comes from the FEDTUNE_BENCH_CONFIG environment variable (Ray actors inherit it).
"""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtune.assembly import build_workbench, local_client_data, make_handler, plan_of
from fedtune.config import ExperimentConfig
from fedtune.core.rng import DOWNLINK, torch_generator
from fedtune.data.prepare import prepare_federated_data
from fedtune.paradigms.parameter_sharing.messages import TrainRequest
from fedtune.wire.link import Link

server_app, client_app = ServerApp(), ClientApp()
LOSSES: list[float] = []  # per round, averaged over clients by example count


def _cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate_json(os.environ["FEDTUNE_BENCH_CONFIG"])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _cfg()
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    plan = plan_of(cfg)
    bench = build_workbench(cfg, plan, announce=False)  # the FlowerTune pattern: a model per client call
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.seed)
    mine = local_client_data([data.train[i] for i in data.parts[pid]], bench.encoder, cfg, pid)
    handler = make_handler(plan, bench, {pid: mine})
    params = {k: v.float() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    rnd = int(msg.content["config"]["server-round"])
    wire, _ = Link().encode(params, {}, torch_generator(DOWNLINK, cfg.seed, rnd))
    reply, _ = handler.paradigm.train(pid, TrainRequest(rnd, wire), {})
    delta = Link().decode(reply.delta, params)
    new = {k: params[k] + delta[k] for k in params}
    metrics = MetricRecord({"num-examples": reply.num_examples, "train_loss": reply.train_loss})
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=new), "metrics": metrics}), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = _cfg()
    n = cfg.partition.num_clients
    initial = build_workbench(cfg, plan_of(cfg), announce=False).initial
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    result = strategy.start(
        grid, ArrayRecord(torch_state_dict=initial), num_rounds=cfg.federation.rounds, train_config=ConfigRecord({})
    )
    for _round, metrics in sorted(result.train_metrics_clientapp.items()):
        LOSSES.append(float(metrics["train_loss"]))
