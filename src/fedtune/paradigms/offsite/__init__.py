"""Offsite-tuning: clients tune the outer blocks of a model whose middle they only see as an emulator.

The server compresses the middle of the full model (``emulator.py``: uniform layer drop, optionally
distilled, ``distill.py``) and sends clients that emulator once; they tune the first and last blocks
around it (LoRA, another method confined to them, or every weight of them: ``adapter.method=blocks``),
and the federation is parameter sharing's round on those adapters (this paradigm
extends it). The server plugs the aggregated adapter into the full model, and evaluates both.
"""

from fedtune.config.experiment import PARADIGM_KEYS
from fedtune.config.paradigm import Capabilities, Paradigm
from fedtune.paradigms.offsite.settings import OffsiteConfig, check, resolve

PARADIGM = Paradigm(
    name="offsite",
    summary="clients tune the first and last blocks around a compressed emulator of the middle; the server "
    "plugs the adapter into the full model (Offsite-Tuning)",
    settings=OffsiteConfig,
    # every paradigm-dependent key: parameter sharing's round on the adapter blocks, the public set to distil,
    # re-align or prune on; one adapter rank (heterogeneous ranks are not supported)
    reads=(*PARADIGM_KEYS, "-adapter.client_ranks"),
    capabilities=Capabilities(
        client_dp=True,
        secure_agg=True,
        dp_sgd=True,
        gradient_checkpointing=True,
        continues_mid_round=True,  # secure aggregation's exchanges, as in parameter sharing
        client_base=False,  # a client builds the emulator it is sent, never the full model
    ),
    setup="fedtune.paradigms.offsite.setup",
    check=check,
    resolve=resolve,
    docs="docs/algorithms/offsite.md",
    extends="parameter_sharing",
)
