import math

import pytest
import torch

from fedtune.paradigms.evaluation import EvalReply, EvalRequest
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.wire.messages import decode_message, encode_message
from fedtune.wire.serialize import decode, encode, read_header


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_tensors_round_trip_with_dtype(dtype):
    t = {"x": (torch.arange(12).reshape(3, 4) - 6).to(dtype), "y": torch.ones(2, dtype=dtype)}
    out, header = decode(encode(t, {"round": 3}))
    assert header == {"round": 3}
    assert all(out[k].dtype == dtype and torch.equal(out[k], t[k]) for k in t)


def test_bytes_are_exact_and_no_pickle():
    t = {"w": torch.zeros(1000, dtype=torch.bfloat16)}
    blob = encode(t, {})
    assert 2000 < len(blob) < 2000 + 200  # 2 bytes per bf16 element plus a small JSON header
    assert b"pickle" not in blob and not blob.startswith(b"\x80")  # safetensors: u64 header length + JSON


def test_decoded_tensors_come_in_name_order_every_time():
    names = [f"t{i:02d}/{kind}" for i in range(12) for kind in ("meta", "packed")]
    blob = encode({k: torch.zeros(1) for k in reversed(names)})
    assert all(list(decode(blob)[0]) == names for _ in range(20))  # safetensors alone: hash-map order


def test_non_contiguous_tensors_are_fine():
    t = {"x": torch.randn(4, 6).t()}
    out, _ = decode(encode(t))
    assert torch.equal(out["x"], t["x"])


def test_messages_round_trip():
    req = TrainRequest(round=2, params={"a": torch.randn(3)})
    back = decode_message(encode_message(req), TrainRequest)
    assert isinstance(back, TrainRequest) and back.round == 2 and torch.equal(back.params["a"], req.params["a"])
    rep = TrainReply(
        round=2,
        delta={},
        num_examples=4,
        num_tokens=9,
        steps=0,
        train_loss=math.nan,
        local_train_s=0.1,
        status="diverged",
        error="boom",
    )
    back = decode_message(encode_message(rep), TrainReply)
    assert back.status == "diverged" and back.error == "boom" and math.isnan(back.train_loss)
    ev = EvalReply(round=1, metrics={"loss": 1.5})
    assert decode_message(encode_message(ev), EvalReply, TrainReply) == ev
    assert read_header(encode_message(ev))["kind"] == "eval_reply"


def test_a_reader_gets_only_the_kinds_it_asked_for():
    with pytest.raises(ValueError, match="not an expected fedtune message"):
        decode_message(encode({"x": torch.ones(1)}, {"kind": "weird"}), TrainReply)
    ev = encode_message(EvalReply(round=1, metrics={"loss": 1.5}))
    with pytest.raises(ValueError, match="expected one of \\['train_reply'\\]"):
        decode_message(ev, TrainReply)


def _reply_header(**changes) -> bytes:
    header = dict(kind="train_reply", round=1, num_examples=4, num_tokens=9, steps=1, train_loss=0.5, local_train_s=0.1)
    return encode({"delta/0": torch.zeros(2)}, {**header, **changes})


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"num_examples": "4"}, "field 'num_examples': str is not"),
        ({"num_examples": 4.5}, "field 'num_examples': float is not"),
        ({"steps": True}, "field 'steps': bool is not"),
        ({"train_loss": [1]}, "field 'train_loss': list is not"),
        ({"status": "great"}, "field 'status'"),
        ({"error": {"a": 1}}, "field 'error'"),
        ({"admin": 1}, "unknown header fields \\['admin'\\]"),
        ({"round": None}, "field 'round'"),
    ],
)
def test_a_header_that_does_not_fit_the_message_is_refused(changes, why):
    assert decode_message(_reply_header(), TrainReply).num_examples == 4
    with pytest.raises(ValueError, match=why):
        decode_message(_reply_header(**changes), TrainReply)


def test_a_missing_header_field_or_stray_tensor_is_refused():
    blob = encode({"delta/0": torch.zeros(2)}, {"kind": "train_reply", "round": 1})
    with pytest.raises(ValueError, match="lacks header field 'num_examples'"):
        decode_message(blob, TrainReply)
    blob = encode({"weights/0": torch.zeros(2)}, {"kind": "evaluate", "round": 1})
    with pytest.raises(ValueError, match="outside its fields"):
        decode_message(blob, EvalRequest)
    blob = encode({"delta": torch.zeros(2)}, {"kind": "train_reply", "round": 1})
    with pytest.raises(ValueError, match="does not fit its field 'delta'"):
        decode_message(blob, TrainReply)
