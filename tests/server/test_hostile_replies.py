"""Hostile replies, generated: valid replies mutated as an attacker would, fed through the real path.

Each case is one train exchange of a real paradigm (parameter sharing over several codec chains, or
KD) carried by the round loop's ``Network``: encode the request, receive the replies, decode,
validate, aggregate. Clients 0 and 2 are honest; client 1's reply is mutated (bytes truncated or
flipped, header fields replaced, codec meta and packed tensors rewritten, replies under other ids).
Every case must end with client 1 dropped with a one-line reason and the new state exactly what the
honest clients alone give, or with a reply that passes every check (a flipped tensor byte can make
another valid update) and a finite model. The peak memory of a whole category is bounded too
(Linux: VmHWM, reset first), so no mutation makes the server allocate what the meta declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedtune.aggregation import fedavg
from fedtune.aggregation.clipping import update_norm
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.schedule import UpdateBound
from fedtune.config.training import TrainingConfig
from fedtune.core.types import Envelope
from fedtune.data.formats import from_instruction
from fedtune.paradigms.base import Replies, update_limit
from fedtune.paradigms.kd.distributions import id_dtype
from fedtune.paradigms.kd.messages import LOGP, KDReply
from fedtune.paradigms.kd.public import PublicSet
from fedtune.paradigms.kd.server import KDSettings, KnowledgeDistillation
from fedtune.paradigms.parameter_sharing.messages import TrainReply
from fedtune.paradigms.parameter_sharing.server import ParameterSharing, SharingSettings
from fedtune.server.round_loop import Network
from fedtune.wire.link import META, Link
from fedtune.wire.messages import encode_message
from fedtune.wire.serialize import read_header
from tests.helpers.hostile import (
    PEAK_GROWTH_LIMIT,
    SETTINGS,
    Replay,
    byte_mutations,
    decode_parts,
    encode_parts,
    header_mutations,
    meta_mutations,
    mutate_tensor,
    peak_growth,
    run_category,
    with_fedtune_header,
)

MAX_NORM = 5.0
CHAINS: dict[str, list[dict]] = {
    "plain": [],
    "topk+int8": [{"name": "topk", "fraction": 0.25}, {"name": "int8"}],
    "randk+fp16": [{"name": "randk", "fraction": 0.5}, {"name": "fp16"}],
    "lowrank": [{"name": "lowrank", "rank": 2}],
    "block_dropout+int4": [{"name": "block_dropout", "keep_fraction": 0.5}, {"name": "int4"}],
    "defaults": [],  # the default config: aggregation.max_update_norm=auto over the default training
}
RUN_DIR = Path("/nonexistent/hostile")  # only named in a quorum error, which these cases never reach


@dataclass
class Federation:
    """A paradigm, its state before round 1, the honest clients' reply blobs, and the honest-only result."""

    paradigm: Any
    state: Any
    blobs: dict[int, bytes]
    honest: Any  # the new state from clients 0 and 2 alone
    max_norm: float = MAX_NORM  # the bound its updates are held to in round 1

    def round(self, envelopes: list[Envelope]) -> tuple[Replies, Any]:
        conversation = self.paradigm.round(1, self.state, [0, 1, 2])
        exchange = next(conversation)
        replies = Network(Replay(envelopes), 1, [0, 1, 2], 1, RUN_DIR).exchange(exchange)
        try:
            conversation.send(replies)
        except StopIteration as done:
            return replies, done.value[0]
        raise AssertionError("a round of one exchange asked for another")

    def envelopes(self, hostile: bytes) -> list[Envelope]:
        return [Envelope(0, self.blobs[0]), Envelope(1, hostile), Envelope(2, self.blobs[2])]


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.q_proj.lora_A": torch.randn(4, 24, generator=g),
        "model.layers.0.q_proj.lora_B": torch.randn(24, 4, generator=g),
        "model.layers.1.q_proj.lora_A": torch.randn(4, 24, generator=g),
        "model.layers.1.bias": torch.randn(10, generator=g),
    }


@cache
def sharing(chain: str) -> Federation:
    params = _params()
    link = Link.from_specs(CHAINS[chain])
    bound, scale = MAX_NORM, 0.05
    if chain == "defaults":  # what a config that says nothing about the bound gets
        bound, _ = UpdateBound.of(TrainingConfig(), 3, 100)
        scale = 1e-3  # what 5 AdamW steps at lr 1e-3 can do to a value
    settings_ = SharingSettings(3, 0, max_update_norm=bound, weight_cap=WeightCap(100, 64))
    paradigm = ParameterSharing(fedavg(), settings_, params, uplink=link)
    state = paradigm.initial_state()
    blobs = {}
    for c in range(3):
        g = torch.Generator().manual_seed(c + 1)
        delta = {k: scale * torch.randn(v.shape, generator=g) for k, v in params.items()}
        wire = link.encode(delta, {}, torch.Generator().manual_seed(c))[0]
        fields = dict(round=1, num_examples=10 + c, num_tokens=90, steps=3, train_loss=1.5, local_train_s=0.2)
        blobs[c] = encode_message(TrainReply(delta=wire, **fields))
    fed = Federation(paradigm, state, blobs, None, update_limit(bound, 1, params))
    replies, fed.honest = fed.round([Envelope(0, blobs[0]), Envelope(2, blobs[2])])
    assert sorted(replies.accepted) == [0, 2]
    _, both = fed.round(fed.envelopes(blobs[1]))
    assert not _same(both, fed.honest)  # client 1's honest reply counts: a drop is visible
    return fed


V, K = 300, 4


@cache
def kd() -> Federation:
    from fedtune.data.tokenize import Encoder
    from fedtune.models.tiny import build_byte_tokenizer

    examples = [from_instruction(f"Say {w}.", w) for w in ("apple", "river", "stone", "cloud")]
    encoded, _ = Encoder(build_byte_tokenizer(), "chat", None, 64).encode_all(examples)
    public = PublicSet(examples, encoded, "test", "d1g35t")
    settings_ = KDSettings("logits", K, K, 2, "examples", 3, V, 0, WeightCap(100, 64))
    paradigm = KnowledgeDistillation(settings_, public, {}, Link.from_specs([{"name": "int8"}]), Link())
    state = paradigm.initial_state()
    conversation = paradigm.round(1, state, [0, 1, 2])
    rows = next(conversation).messages[0].score
    rows = public.positions(rows)
    blobs = {}
    for c in range(3):
        ids = torch.stack(
            [torch.randperm(V, generator=torch.Generator().manual_seed(c * 100 + i))[:K] for i in range(rows)]
        )
        logp = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05]] * rows))
        wire = paradigm.uplink.encode({LOGP: logp}, {}, torch.Generator())[0]
        fields = dict(round=1, num_examples=5 + c, steps=2, train_loss=2.0, distill_loss=None, local_train_s=0.1)
        blobs[c] = encode_message(KDReply(ids=ids.to(id_dtype(V)), logp=wire, **fields))
    fed = Federation(paradigm, state, blobs, None)
    replies, fed.honest = fed.round([Envelope(0, blobs[0]), Envelope(2, blobs[2])])
    assert sorted(replies.accepted) == [0, 2]
    return fed


def _same(a, b) -> bool:
    """Two server states are the same to the bit (params and every tensor of the algorithm state)."""
    fa, fb = _tensors(a.params) + _tensors(a.algorithm), _tensors(b.params) + _tensors(b.algorithm)
    return len(fa) == len(fb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(fa, fb, strict=True))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    if isinstance(obj, tuple | list):
        return [t for x in obj for t in _tensors(x)]
    return []


def check_outcome(fed: Federation, hostile: bytes) -> None:
    """The property every case must satisfy (see the module docstring)."""
    replies, new = fed.round(fed.envelopes(hostile))
    assert sorted(replies.accepted) in ([0, 2], [0, 1, 2]), replies.dropped
    if 1 in replies.dropped:
        why = replies.dropped[1]
        assert why and "\n" not in why and "\r" not in why and len(why) <= 400, why
        assert _same(new, fed.honest)
        return
    used = replies.accepted[1]  # still a valid reply: it must pass every check the server makes
    if isinstance(fed.paradigm, ParameterSharing):
        delta = used.contribution.delta
        assert all(torch.isfinite(t).all() and t.shape == fed.state.params[k].shape for k, t in delta.items())
        assert update_norm(delta) <= fed.max_norm and 0 < used.contribution.weight <= 100
    else:
        assert used.top.ids.max() < V and torch.isfinite(used.top.logp).all() and used.top.logp.max() <= 0
    assert all(torch.isfinite(t).all() for t in _tensors(new.params) + _tensors(new.algorithm) if t.is_floating_point())


@st.composite
def kd_mutations(draw, blob: bytes) -> bytes:
    """KD's own fields: token ids (range, dtype, shape, repeats) and log-probabilities."""
    tensors, header = decode_parts(blob)
    kind = draw(st.sampled_from(["ids", "logp", "header"]))
    if kind == "ids":
        tensors["ids"] = mutate_tensor(draw, tensors["ids"]).reshape(-1)
        if draw(st.booleans()) and tensors["ids"].numel() % K == 0:
            tensors["ids"] = tensors["ids"].reshape(-1, K)
    elif kind == "logp":
        packed = draw(st.sampled_from(sorted(k for k in tensors if k.startswith("logp/") and not k.endswith(META))))
        tensors[packed] = mutate_tensor(draw, tensors[packed])
    else:
        return draw(header_mutations(blob))
    return encode_parts(tensors, header)


# ---- the categories ------------------------------------------------------------------------------


def test_truncated_flipped_and_padded_bytes():
    @SETTINGS
    @given(chain=st.sampled_from(sorted(CHAINS)), data=st.data())
    def case(chain, data):
        fed = sharing(chain)
        check_outcome(fed, data.draw(byte_mutations(fed.blobs[1])))

    run_category(case)


def test_header_fields_of_wrong_type_size_or_depth():
    @SETTINGS
    @given(chain=st.sampled_from(sorted(CHAINS)), data=st.data())
    def case(chain, data):
        fed = sharing(chain)
        check_outcome(fed, data.draw(header_mutations(fed.blobs[1])))

    run_category(case)


def test_codec_meta_and_packed_tensors_rewritten():
    @SETTINGS
    @given(chain=st.sampled_from(sorted(CHAINS)), data=st.data())
    def case(chain, data):
        fed = sharing(chain)
        check_outcome(fed, data.draw(meta_mutations(fed.blobs[1])))

    run_category(case)


def test_with_the_defaults_no_update_can_replace_the_model():
    """aggregation.max_update_norm=auto: every value 1e30, or the update scaled up, is refused; the model stays
    what the honest clients make."""
    fed = sharing("defaults")

    @SETTINGS
    @given(scale=st.sampled_from([1e30, -1e30, 1e6, 100.0, 3e38]), every=st.booleans())
    def case(scale, every):
        tensors, header = decode_parts(fed.blobs[1])
        for k, t in tensors.items():
            if t.is_floating_point():
                tensors[k] = torch.full_like(t, scale) if every else t * scale
        replies, new = fed.round(fed.envelopes(encode_parts(tensors, header)))
        assert "max_update_norm" in replies.dropped[1] and _same(new, fed.honest)

    run_category(case)


def test_kd_token_ids_and_log_probabilities():
    @SETTINGS
    @given(data=st.data())
    def case(data):
        fed = kd()
        check_outcome(fed, data.draw(kd_mutations(fed.blobs[1])))

    run_category(case)


def test_replies_under_other_ids_count_once_and_never_for_another_client():
    """The transport says which request a reply answers; duplicates and strangers are ignored."""

    @SETTINGS
    @given(
        chain=st.sampled_from(sorted(CHAINS)),
        extra=st.lists(
            st.tuples(st.integers(-3, 9), st.sampled_from([0, 1, 2, -1])), min_size=1, max_size=6
        ),  # (claimed id, whose blob: a client's, or -1 garbage)
        drop_one=st.booleans(),
    )
    def case(chain, extra, drop_one):
        fed = sharing(chain)
        envelopes = fed.envelopes(fed.blobs[1])
        if drop_one:
            envelopes = envelopes[:1] + envelopes[2:]  # client 1 never answers: its id may be forged
        envelopes += [Envelope(cid, fed.blobs[src] if src >= 0 else b"junk") for cid, src in extra]
        replies, new = fed.round(envelopes)
        firsts: dict[int, bytes] = {}
        for env in sorted(envelopes, key=lambda e: e.client_id):  # the loop reads each client's first reply
            if env.client_id in (0, 1, 2):
                firsts.setdefault(env.client_id, env.payload)
        assert set(replies.accepted) | set(replies.dropped) == {0, 1, 2}
        for c in (0, 1, 2):
            if c in replies.accepted:
                assert firsts[c] in fed.blobs.values()
        expect, _ = fed.round([Envelope(c, p) for c, p in firsts.items()])
        assert sorted(expect.accepted) == sorted(replies.accepted)
        assert all(torch.isfinite(t).all() for t in new.params.values())

    run_category(case)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_every_honest_reply_is_accepted(chain):
    """The suite's baseline: unmutated replies all pass, so a drop above is the mutation's doing."""
    fed = sharing(chain)
    replies, _ = fed.round(fed.envelopes(fed.blobs[1]))
    assert sorted(replies.accepted) == [0, 1, 2] and replies.dropped == {}


def test_kd_honest_replies_are_accepted():
    fed = kd()
    replies, _ = fed.round(fed.envelopes(fed.blobs[1]))
    assert sorted(replies.accepted) == [0, 1, 2] and replies.dropped == {}


def test_peak_memory_is_measured():
    """The memory bound is real where it can be: an allocation the size of a crafted shape shows."""
    growth = peak_growth(lambda: torch.ones(128 * 2**20).sum())  # 512 MiB touched
    assert growth == -1 or growth >= PEAK_GROWTH_LIMIT


def test_with_fedtune_header_rewrites_only_the_header():
    fed = sharing("plain")
    blob = fed.blobs[1]
    same = with_fedtune_header(blob, read_header(blob))
    assert read_header(same) == read_header(blob) and decode_parts(same)[0].keys() == decode_parts(blob)[0].keys()
