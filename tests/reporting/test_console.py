"""The run's closing summary table, as the console prints it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedtune.reporting.console import summary_table


def _summary(epsilon: float | None, z: float) -> dict:
    evals = {"round": 0, "eval_loss": 4.3, "eval_accuracy": 0.01}
    return {
        "initial": evals,
        "final": {**evals, "round": 5, "eval_loss": 3.7},
        "rounds_completed": 5,
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "noise_multiplier": z, "clip_norm": 0.3,
                    "sampling": "poisson", "sample_rate": 0.25},
        "trainable_params": 10, "trainable_fraction": 0.001, "total_bytes_up": 1, "total_bytes_down": 1,
        "total_local_train_s": 1.0, "total_wall_s": 2.0, "dropped_updates": 0, "final_adapter": "run/final_adapter",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("epsilon", "z", "shown"), [(5.27, 1.0, "epsilon 5.27 at delta 1e-05"), (None, 0.0, "epsilon infinite")]
)
def test_the_summary_states_epsilon_even_when_no_noise_makes_it_infinite(epsilon, z, shown):
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(_summary(epsilon, z)))
    assert shown in out.getvalue() and f"z {z:.3g}" in out.getvalue()
