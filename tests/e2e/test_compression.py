"""Update compression from the CLI config: bytes on the wire, error feedback state, and failure modes."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.experiment import run_experiment
from fedtune.server.checkpoint import load_latest
from tests.helpers.configs import TINY_OVERRIDES


def _run(tmp_path, name: str, *extra: str):
    cfg = load_config(
        "examples/tiny.yaml",
        [
            *TINY_OVERRIDES,
            "federation.rounds=2",
            "evaluation.exact_match=false",
            f"output.dir={tmp_path}",
            f"output.name={name}",
            *extra,
        ],
    )
    result = run_experiment(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, rounds[1:]


def test_chains_cut_the_bytes_each_codec_promises(tmp_path):
    _, plain = _run(tmp_path, "plain")
    _, int8 = _run(tmp_path, "int8", "compression.uplink=[int8]", "compression.downlink=[bf16]")
    _, sparse = _run(tmp_path, "sparse", "compression.uplink=[{name: topk, fraction: 0.1}, int4]")
    up = {name: rounds[0]["bytes_up"] for name, rounds in (("plain", plain), ("int8", int8), ("sparse", sparse))}
    # int8 is 1 byte per value (+ a scale per rank component and the message header): ~4x on this
    # tiny adapter (29k values); tests/wire/test_link.py checks the ratios at SmolLM2's size
    assert 3.3 < up["plain"] / up["int8"] < 4.05
    assert 1.9 < plain[0]["bytes_down"] / int8[0]["bytes_down"] < 2.05
    # top 10% as int4 values + int16 indices: 2.5 bytes per kept value instead of 4 per value: ~16x
    assert 9 < up["plain"] / up["sparse"] < 16.5
    assert sparse[0]["bytes_down"] == plain[0]["bytes_down"]  # no downlink chain


def test_error_feedback_residual_is_client_state_in_the_checkpoint(tmp_path):
    result, _ = _run(
        tmp_path, "ef", "compression.uplink=[{name: topk, fraction: 0.05}]", "compression.error_feedback=true"
    )
    ckpt = load_latest(result.run_dir, result.state.algorithm)
    assert sorted(ckpt.clients) == [0, 1, 2, 3]
    for state in ckpt.clients.values():
        residual = state["residual"]
        assert len(residual) == len(result.state.params)  # one per adapter tensor (named by index)
        flat = torch.cat([v.reshape(-1) for v in residual.values()])
        assert (flat != 0).float().mean() > 0.8  # top-5% sent, the rest carried over
        assert all(v.dtype == torch.float32 for v in residual.values())


def test_compressed_training_still_learns(tmp_path):
    result, _ = _run(
        tmp_path,
        "learns",
        "compression.uplink=[{name: topk, fraction: 0.25}, int8]",
        "compression.error_feedback=true",
        "compression.downlink=[bf16]",
        "federation.rounds=3",
    )
    initial = result.summary["initial"]["eval_loss"]
    assert result.summary["final"]["eval_loss"] < initial - 0.05


def test_sparsifying_the_downlink_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="downlink carries the global adapter itself"):
        load_config(None, ["compression.downlink=[{name: topk, fraction: 0.1}]"])
    with pytest.raises(ConfigError, match="codec int8 takes no \\['fraction'\\]"):
        load_config(None, ["compression.uplink=[{name: int8, fraction: 0.1}]"])
    with pytest.raises(ConfigError, match="error_feedback needs a compression.uplink"):
        load_config(None, ["compression.error_feedback=true"])


def test_a_client_with_other_codecs_is_dropped_not_misread(tmp_path, caplog):
    """A client whose uplink chain differs from the server's (a misconfigured deployment) is refused."""
    from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
    from fedtune.wire.link import Link

    real_init = ParameterSharingClient.__init__

    def other_codecs(self, *a, **k):
        real_init(self, *a, **k)
        self.uplink = Link.from_specs([{"name": "int4"}])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ParameterSharingClient, "__init__", other_codecs)
        with pytest.raises(Exception, match="cannot decode the update with codecs 'int8"):
            _run(tmp_path, "mismatch", "compression.uplink=[int8]")


def test_downlink_updates_let_the_downlink_shrink_like_the_uplink(tmp_path):
    """Clients receive the compressed change to the adapter they hold; server and client replicas
    stay bit-identical, and the sparse downlink costs a fraction of sending the adapter."""
    from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient

    chain = "[{name: topk, fraction: 0.1}, int8]"
    _, plain = _run(tmp_path, "plain")
    held_by_client: dict[int, dict] = {}
    real = ParameterSharingClient.train

    def spy(self, client_id, req, state):
        reply, state = real(self, client_id, req, state)
        held_by_client[client_id] = state["held"]
        return reply, state

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ParameterSharingClient, "train", spy)
        result, rounds = _run(
            tmp_path,
            "updates",
            f"compression.downlink={chain}",
            "compression.downlink_updates=true",
            "federation.rounds=3",
            # exact mode's first round moves A from its seeded init to a balanced factorisation,
            # a change as large as A that a sparse downlink delivers over several rounds
            "aggregation.lora=naive",
        )
    assert plain[0]["bytes_down"] / rounds[0]["bytes_down"] > 9
    ckpt = load_latest(result.run_dir, result.state.algorithm)
    assert sorted(ckpt.replicas) == [0, 1, 2, 3]
    assert len({id(r) for r in ckpt.replicas.values()}) == 1  # full participation: one shared replica
    for c, held in held_by_client.items():
        assert held.keys() == ckpt.replicas[c].keys()
        assert all(torch.equal(held[k], ckpt.replicas[c][k]) for k in held)  # both ends agree to the bit
    # the replica trails the global adapter only by what the downlink has not delivered yet
    replica, final = ckpt.replicas[0], result.state.params
    gap = sum(float((final[k] - replica[k]).pow(2).sum()) for k in final) ** 0.5
    norm = sum(float(v.pow(2).sum()) for v in final.values()) ** 0.5
    assert 0 < gap < 0.5 * norm
    assert result.summary["final"]["eval_loss"] < result.summary["initial"]["eval_loss"]


def test_sparse_downlink_without_updates_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="set compression.downlink_updates: true"):
        load_config(None, ["compression.downlink=[{name: topk, fraction: 0.1}]"])
    with pytest.raises(ConfigError, match="downlink_updates needs one adapter rank"):
        load_config(None, ["compression.downlink_updates=true", "adapter.r=8", "adapter.client_ranks=[2,4]"])
