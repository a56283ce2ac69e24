import math

import pytest
import torch

from fedtune.types import EvalReply, TrainReply, TrainRequest
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


def test_non_contiguous_tensors_are_fine():
    t = {"x": torch.randn(4, 6).t()}
    out, _ = decode(encode(t))
    assert torch.equal(out["x"], t["x"])


def test_messages_round_trip():
    req = TrainRequest(round=2, params={"a": torch.randn(3)})
    back = decode_message(encode_message(req))
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
    back = decode_message(encode_message(rep))
    assert back.status == "diverged" and back.error == "boom" and math.isnan(back.train_loss)
    ev = EvalReply(round=1, metrics={"loss": 1.5})
    assert decode_message(encode_message(ev)) == ev
    assert read_header(encode_message(ev))["kind"] == "eval_reply"


def test_foreign_blob_is_rejected():
    with pytest.raises(ValueError, match="not a fedtune message"):
        decode_message(encode({"x": torch.ones(1)}, {"kind": "weird"}))
