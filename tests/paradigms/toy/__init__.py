"""A toy paradigm defined only here, in tests: each client replies with a number, the server averages them.

It touches nothing in the package: a config names it by its import path,
``paradigm: {name: "tests.paradigms.toy:PARADIGM", scale: 2.0}``, and every process that reads that
config (the server, each Ray worker, each deployed client) imports it from there. What it proves is
that a paradigm is one self-declaring plug-in: its settings, what it reads, what it supports and its
two halves, nothing else.
"""

from pydantic import Field

from fedtune.config.paradigm import Capabilities, Paradigm, ParadigmConfig


class ToyConfig(ParadigmConfig):
    """The toy paradigm's settings."""

    scale: float = Field(1.0, gt=0, description="each client replies scale x its number of training examples")


PARADIGM = Paradigm(
    name="toy",
    summary="clients reply with a scalar; the server averages it",
    settings=ToyConfig,
    reads=(),  # none of the keys only some paradigms use
    capabilities=Capabilities(),
    setup="tests.paradigms.toy.setup",
    docs="tests/paradigms/toy",
)
