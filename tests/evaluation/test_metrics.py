import pytest

from fedtune.evaluation.metrics import exact_match, grouped_accuracy, normalize_answer


@pytest.mark.parametrize(
    "pred, ref, hit",
    [
        (" 85\n", "85", True),
        ("85.", "85", True),
        ("APPLE", "apple", False),
        ("85 apples", "85", False),
        ("elppa", "elppa", True),
        ("", "0", False),
    ],
)
def test_exact_match(pred, ref, hit):
    assert exact_match(pred, ref) is hit


def test_normalize_keeps_inner_text():
    assert normalize_answer("  apple apple. ") == "apple apple"


def test_grouped_accuracy():
    acc = grouped_accuracy([True, False, True, True], ["a", "a", "b", None])
    assert acc == {"a": 0.5, "b": 1.0}
