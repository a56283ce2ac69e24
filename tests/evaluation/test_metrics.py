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


@pytest.mark.parametrize(
    "prediction", ["42", " 42", "42.", "42 .", "42\n", " 42. ", "4", "forty-two", "42 apples", "4 2", "x42", ""]
)
@pytest.mark.parametrize("reference", ["42", "42.", "4"])
def test_could_still_match_never_rejects_a_prefix_of_a_match(prediction, reference):
    from fedtune.evaluation.metrics import could_still_match

    for cut in range(len(prediction) + 1):
        if exact_match(prediction, reference):
            assert could_still_match(prediction[:cut], reference)


@pytest.mark.parametrize(
    ("partial", "reference", "possible"),
    [
        ("4", "42", True),
        (" 42 .", "42", True),
        ("42. ", "42.", True),
        ("42 apples", "42", False),
        ("4 2", "42", False),
        ("x", "42", False),
        ("43", "42", False),
        ("42..", "42", False),
    ],
)
def test_could_still_match_rejects_a_text_that_departed(partial, reference, possible):
    from fedtune.evaluation.metrics import could_still_match

    assert could_still_match(partial, reference) is possible
