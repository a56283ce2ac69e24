"""Every dataset recipe on a generated fixture of its set's published schema, in every file form."""

import json

import pytest

from fedtune.core.errors import DataError
from fedtune.core.registry import DATASET_RECIPES
from fedtune.data import partitioners
from fedtune.data.builtin.shaped import records
from fedtune.data.formats import load_examples
from fedtune.data.items import AnswerItem, ChoiceItem, CodeItem, load_items
from fedtune.data.prepare import field_values

SHAPE_TYPES = {"choice": ChoiceItem, "answer": AnswerItem, "code": CodeItem}


def _write(rows, tmp_path, form):
    if isinstance(rows, dict):  # FedLLM-Bench: one object of clients
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
        return path
    if form == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMS = [(name, "jsonl") for name in DATASET_RECIPES.names()] + [
    (name, form)
    for name in ("dolly", "mmlu")
    for form in ("parquet", "saved")  # the readers under every recipe
]


@pytest.mark.parametrize(("name", "form"), FORMS)
def test_each_recipe_reads_its_fixture_and_splits_by_its_natural_field(name, form, tmp_path):
    recipe = DATASET_RECIPES.load(name)
    rows = records(name, 12)
    path = _write(rows, tmp_path, form)
    assert recipe.name == name and (recipe.example or recipe.item)
    if recipe.example is not None:
        examples = load_examples(path, recipe)
        assert len(examples) == 12 and all(ex.target.strip() for ex in examples)
        if recipe.split_field:
            labels = field_values(examples, recipe.split_field, str(path))
            parts = partitioners.by_field(labels, None)
            assert len(parts) == len(set(labels)) >= 2  # one client per natural value
    if recipe.item is not None:
        items = load_items(str(path), recipe)
        assert len(items) == 12 and all(isinstance(it, SHAPE_TYPES[recipe.shape]) for it in items)


def test_columns_map_as_the_sets_define_them(tmp_path):
    dolly = records("dolly", 3)[0]
    ex = load_examples(_write([dolly], tmp_path, "jsonl"), DATASET_RECIPES.load("dolly"))[0]
    context = f"\n\n{dolly['context']}" if dolly["context"] else ""
    assert ex.messages[0]["content"] == dolly["instruction"] + context and ex.target == dolly["response"]
    assert ex.meta["category"] == dolly["category"]

    def item(name, row):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        return load_items(str(path), DATASET_RECIPES.load(name))[0]

    mmlu = records("mmlu", 1)[0]
    got = item("mmlu", mmlu)
    assert got.choices[got.answer] == str(eval(mmlu["question"][8:-1])) and got.group == mmlu["subject"]
    med = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2, "subject_name": "Anatomy"}
    assert item("medmcqa", med) == ChoiceItem("q", ("a", "b", "c", "d"), 2, "Anatomy")
    medqa = {"question": "q", "options": {"B": "two", "A": "one", "C": "three", "D": "four"}, "answer_idx": "C"}
    assert item("medqa", medqa) == ChoiceItem("q", ("one", "two", "three", "four"), 2)
    options = [{"key": "A", "value": "one"}, {"key": "B", "value": "two"}]
    bigbio = {"question": "q", "options": options, "answer_idx": "B"}
    assert item("medqa", bigbio) == ChoiceItem("q", ("one", "two"), 1)  # BigBIO's source schema (FlowerTune's copy)
    pub = records("pubmedqa", 3)[1]  # "no"
    assert item("pubmedqa", pub).choices[item("pubmedqa", pub).answer] == "no"
    assert item("pubmedqa", pub).context == pub["context"]["contexts"][0]
    source = {"QUESTION": "Is it?", "CONTEXTS": ["One.", "Two."], "final_decision": "maybe", "LONG_ANSWER": "."}
    assert item("pubmedqa", source) == ChoiceItem("Is it?", ("yes", "no", "maybe"), 2, context="One.\nTwo.")
    care = {"question": "q", "op1": "a", "op2": "b", "op3": "c", "op4": "d", "cop": 1, "category": "Nursing"}
    assert item("careqa", care) == ChoiceItem("q", ("a", "b", "c", "d"), 0, "Nursing")
    with pytest.raises(DataError, match="'cop' must be the right option's number 1..4"):
        item("careqa", {**care, "cop": 0})
    # the sentiment sets' own label orders, all mapped to negative / neutral / positive
    assert item("fpb", {"sentence": "s", "label": 2}) == ChoiceItem("s", ("negative", "neutral", "positive"), 2, "news")
    assert item("fiqa", {"sentence": "s", "sentiment_score": 0.1, "format": "post"}).group == "tweet"
    assert item("tfns", {"text": "t", "label": 0}).answer == 0  # bearish
    assert item("tfns", {"text": "t", "label": 1}).answer == 2  # bullish
    assert item("tfns", {"text": "t", "label": 2}).answer == 1  # neutral
    assert [item("fiqa", {"sentence": "s", "sentiment_score": v}).answer for v in (-0.5, 0.05, 0.3)] == [0, 1, 2]
    gsm = records("gsm8k", 1)[0]
    assert item("gsm8k", gsm).reference.endswith(gsm["answer"].rsplit("#### ", 1)[1])
    he = records("humaneval", 1)[0]
    code = item("humaneval", he)
    assert code.code_prefix == he["prompt"] and code.tests.endswith(f"check({he['entry_point']})\n")
    mbpp = records("mbpp", 1)[0]
    assert all(t in item("mbpp", mbpp).tests for t in mbpp["test_list"])


def test_fedllm_bench_clients_become_the_split_field(tmp_path):
    rows = records("fedllm_bench", 10)
    examples = load_examples(_write(rows, tmp_path, "json"), DATASET_RECIPES.load("fedllm_bench"))
    assert sorted({ex.meta["client"] for ex in examples}) == sorted(rows)
    assert all(ex.messages[0]["role"] == "user" for ex in examples)  # a leading bot turn is dropped


def test_every_bad_record_is_reported_in_one_pass_or_skipped(tmp_path):
    rows = records("gsm8k", 6)
    path = tmp_path / "g.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[1] = "{not json"
    lines[3] = json.dumps({"question": "q", "answer": "no marker"})
    lines[4] = json.dumps({"answer": "#### 1"})
    path.write_text("\n".join(lines) + "\n")
    recipe = DATASET_RECIPES.load("gsm8k")
    with pytest.raises(DataError) as err:
        load_examples(path, recipe)
    msg = str(err.value)
    assert "3 of 6 records are bad" in msg and all(f"g.jsonl:{n}" in msg for n in (2, 4, 5))
    assert "'####'" in msg and "no field 'question'" in msg and "not valid JSON" in msg
    assert len(load_examples(path, recipe, on_error="skip")) == 3


def test_many_bad_records_are_listed_up_to_a_cap(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(50)))
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "50 of 50 records are bad" in str(err.value) and "... and 30 more" in str(err.value)


def test_a_hub_id_that_cannot_be_reached_says_how_to_bring_a_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"save_to_disk\(DIR\)"):
        load_examples("databricks/databricks-dolly-15k", DATASET_RECIPES.load("dolly"))


def test_recipes_of_the_wrong_use_are_refused(tmp_path):
    from fedtune.config import DataConfig

    with pytest.raises(ValueError, match="evaluation set"):
        DataConfig(recipe="mmlu")
    assert DataConfig(recipe="dolly").recipe == "dolly"  # Dolly and GSM8K serve both
    path = _write(records("alpaca", 2), tmp_path, "jsonl")
    with pytest.raises(DataError, match="not evaluation items"):
        load_items(str(path), DATASET_RECIPES.load("alpaca"))
