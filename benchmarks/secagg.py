"""Secure aggregation's cost and precision on the bundled model's adapter, against plain aggregation.

For 4, 16 and 64 simulated clients, one round of the protocol (fedtune's own messages, encoded as they
cross the wire, through the round loop's Network): bytes per client both ways, and seconds for the
whole round (every client's cryptography and the server's unmasking, one after another on this
machine). With no client dropping, and with 10% of the clients dropping either after sending their
masked input (they still count; the others reveal their self-mask seeds) or before (the server
rebuilds their mask keys and removes their pair masks). Plain aggregation is the same updates sent
as float32 and averaged. Precision: the largest error of the securely aggregated mean against the
float mean, at 16 fractional bits.

    python benchmarks/secagg.py                     # 4, 16, 64 clients
    python benchmarks/secagg.py --clients 4 16      # a subset
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import write_result

from fedtune.paradigms.base import converse
from fedtune.paradigms.parameter_sharing import secure_client
from fedtune.paradigms.parameter_sharing.messages import TrainReply
from fedtune.paradigms.parameter_sharing.secure_messages import MaskedInputRequest, ShareKeysRequest, UnmaskRequest
from fedtune.paradigms.parameter_sharing.secure_server import SecureAggregation, secure_sum
from fedtune.privacy.secagg import FixedPoint
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.round_loop import Network
from fedtune.wire.messages import decode_message, encode_message

SERVES = {
    ShareKeysRequest: secure_client.share_keys,
    MaskedInputRequest: secure_client.masked_input,
    UnmaskRequest: secure_client.unmask,
}


def adapter_values() -> int:
    """Values the bundled model's FFA-LoRA adapter sends (B only: A is frozen), from its real config."""
    from fedtune.assembly import build_workbench, plan_of
    from fedtune.config import load_config

    cfg = load_config("examples/private.yaml", ["output.progress=false"])
    bench = build_workbench(cfg, plan_of(cfg), announce=False)
    return sum(t.numel() for t in bench.initial.values())


def one_round(n_clients: int, n_values: int, drop: float, stage: str = "after masking", seed: int = 0) -> dict:
    """One secure round; ``drop`` of the clients leave ``stage`` ("after masking": their updates still count,
    others reveal their self-mask seeds; "before masking": the server removes their pair masks from everyone's)."""
    g = torch.Generator().manual_seed(seed)
    updates = {c: (torch.rand(n_values, generator=g) * 2 - 1) * 0.01 for c in range(n_clients)}
    fp = FixedPoint.fit(1.0, 16, n_clients)
    sec = SecureAggregation(0.67, fp, 0.0, 0.0, -1, lambda *a: a)
    spec = sec.spec(n_clients)
    gone = set(range(n_clients)[: max(1, round(drop * n_clients)) if drop else 0])
    states: dict[int, dict] = {}
    roster, key_bytes = {}, 0
    start = time.perf_counter()
    for c, x in updates.items():  # what the train exchange does after training: encode, make keys
        keys, states[c] = secure_client.prepare({"w": x}, spec, c, 1, {})
        reply = TrainReply(1, {}, 1, 1, 1, 0.0, 0.0, secagg_keys=keys)
        key_bytes += len(encode_message(reply))
        roster[c] = (bytes(keys["c_pk"].numpy()), bytes(keys["s_pk"].numpy()))

    def handle(client: int, payload: bytes, state):
        request = decode_message(payload, *SERVES)
        leaves_at = UnmaskRequest if stage == "after masking" else MaskedInputRequest
        if isinstance(request, leaves_at) and client in gone:
            return b"", state  # gone at this step
        reply, state = SERVES[type(request)](request, state)
        return encode_message(reply), state

    runtime = InProcessRuntime(handle)
    runtime.load_client_states(states)
    net = Network(runtime, 1, list(range(n_clients)), 1, Path("/nonexistent"))
    flat, summed, _ = converse(secure_sum(sec, 1, roster, n_clients, n_values), net.exchange)
    seconds = time.perf_counter() - start
    exact = torch.stack([updates[c] for c in summed]).double().mean(0)
    error = float((flat.double() / len(summed) - exact).abs().max())

    plain_reply = TrainReply(1, {"w": torch.zeros(n_values)}, 1, 1, 1, 0.0, 0.0)
    plain_bytes = len(encode_message(plain_reply))
    t = time.perf_counter()
    torch.stack(list(updates.values())).mean(0)
    plain_s = time.perf_counter() - t
    down, up = net.bytes["train"]
    return {
        "clients": n_clients,
        "dropped": len(gone),
        "dropped_when": stage if gone else None,
        "values": n_values,
        "modulus_bits": fp.modulus_bits,
        "bytes_up_per_client": (up + key_bytes) / n_clients,
        "bytes_down_per_client": down / n_clients,
        "plain_bytes_up_per_client": plain_bytes,
        "expansion_up": (up + key_bytes) / (len(summed) * plain_bytes),  # against sending the summed updates plainly
        "round_s": seconds,
        "round_s_per_client": seconds / n_clients,
        "plain_mean_s": plain_s,
        "max_abs_error_of_mean": error,
        "fixed_point_step": 2.0**-16,
        "summed": len(summed),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    n_values = adapter_values()
    rows = [
        one_round(n, n_values, drop, stage)
        for n in args.clients
        for drop, stage in ((0.0, "after masking"), (0.1, "after masking"), (0.1, "before masking"))
    ]
    write_result("secagg", {"adapter_values": n_values, "rows": rows})


if __name__ == "__main__":
    main()
