"""The ``model`` section: which base model to fine-tune, and where it runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.config.base import Strict


class ModelConfig(Strict):
    """Which base model to fine-tune."""

    name: str = Field("smollm2-135m", description="alias (smollm2-135m, tiny-llama), local dir, .gguf, or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype of the base model")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) for hub ids")
    gguf_file: str | None = Field(None, description="GGUF file name inside model.name's directory/repo")
    trust_remote_code: bool = Field(False, description="allow model code from the hub repo (only for repos you trust)")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="the frozen base's weights stored quantised by bitsandbytes (QLoRA): nf4 (4-bit NormalFloat, "
        "double-quantised) or int8 (LLM.int8()); the adapter stays in model.dtype and is exported in full "
        "precision. Needs `pip install 'fedtune[quantised]'` and a bitsandbytes backend for the device "
        "(docs/peft.md, Quantised bases)",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where the model trains and evaluates: auto (a GPU where torch sees one and the run can use "
        "it: a paradigm that supports it, without DP-SGD, in process or deployed; else the CPU), cpu, cuda or cuda:N",
    )
