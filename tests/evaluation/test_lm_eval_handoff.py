"""The lm-eval hand-off's own parts: what it says without the package, and how it reads lm-eval's results."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fedtune.core.errors import FedtuneError
from fedtune.evaluation import lm_eval_handoff as handoff


def test_without_lm_eval_the_user_is_told_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(FedtuneError, match=r"pip install 'fedtune\[lm-eval\]'"):
        handoff._lm_eval()


def test_scores_keep_the_numbers_by_metric_and_filter():
    results = {
        "mc": {"alias": "mc", "acc,none": np.float64(0.25), "acc_stderr,none": "N/A", "sample_len": 4},
        "gen": {"exact_match,strip": 1, "exact_match_stderr,strip": np.float32(0.5), "flag,none": True},
    }
    got = handoff.scores(results)
    assert got == {"mc": {"acc,none": 0.25}, "gen": {"exact_match,strip": 1.0, "exact_match_stderr,strip": 0.5}}
    assert all(type(v) is float for task in got.values() for v in task.values())


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(FedtuneError, match="config.yaml does not exist"):
        handoff.evaluate_run(tmp_path, ["mc"])
