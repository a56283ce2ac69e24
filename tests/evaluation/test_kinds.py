"""Each evaluation kind against a value computed by hand, and the config rules around them."""

import json
import math

import pytest
import torch

from fedtune.config.evaluation import EvalTaskConfig
from fedtune.core.errors import ConfigError
from fedtune.core.registry import DATASET_RECIPES, EVAL_KINDS
from fedtune.data.builtin.shaped import records
from fedtune.data.items import AnswerItem, ChoiceItem
from fedtune.data.tokenize import Encoder
from fedtune.evaluation import code as code_kind
from fedtune.evaluation import generated
from fedtune.evaluation.answers import code_of, final_number, same_number
from fedtune.evaluation.choice import LabelChoice, MultipleChoice
from fedtune.evaluation.generated import AnswerExtraction, RougeL
from fedtune.evaluation.prompting import chat_prompt, mmlu_block, mmlu_header
from fedtune.evaluation.scoring import Scores
from fedtune.reporting.metrics import BENCHMARK_METRIC

QUESTIONS = [
    ("What is 2 + 2?", ("3", "4", "5", "22")),
    ("Pick the colour.", ("red", "dog", "sky")),
    ("Largest?", ("1", "9", "5", "7")),
    ("Capital of France?", ("Paris", "Rome", "Oslo", "Bern")),
]


def _next_log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def _continuation_ll(model, prompt, cont):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[*prompt, *cont]])).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont))


def _encoder(tiny):
    return Encoder(tiny.tokenizer, "chat", "Be brief.", 256)


@pytest.mark.parametrize("method", ["letter", "option"])
def test_multiple_choice_picks_the_hand_computed_argmax(tiny, method):
    tok, model = tiny.tokenizer, tiny.model
    picks = []
    for q, choices in QUESTIONS:
        item = ChoiceItem(q, choices, 0, "trivia")
        ids = tok(mmlu_header("trivia") + mmlu_block(item, False))["input_ids"]
        if method == "letter":  # the byte tokenizer writes " A" as a space then "A": score "A" after the space
            space = tok(" ", add_special_tokens=False)["input_ids"]
            lp = _next_log_probs(model, ids + space)
            scores = [lp[tok(c, add_special_tokens=False)["input_ids"][0]].item() for c in "ABCD"[: len(choices)]]
        else:
            scores = [
                _continuation_ll(model, ids, tok(f" {c}", add_special_tokens=False)["input_ids"]) for c in choices
            ]
        picks.append(max(range(len(choices)), key=scores.__getitem__))
    right = [ChoiceItem(q, c, p, "trivia") for (q, c), p in zip(QUESTIONS, picks, strict=True)]
    wrong = [
        ChoiceItem(q, c, (p + 1) % len(c), "x" if i % 2 else "y")
        for i, ((q, c), p) in enumerate(zip(QUESTIONS, picks, strict=True))
    ]
    got = MultipleChoice("mc", right, _encoder(tiny), method=method).run(model, 3)
    assert got["mc_accuracy"] == 1.0 and got["mc_accuracy_by_group"] == {"trivia": 1.0}
    got = MultipleChoice("mc", wrong, _encoder(tiny), method=method).run(model, 3)
    assert (
        got["mc_accuracy"] == 0.0 and got["mc_accuracy_macro"] == 0.0 and set(got["mc_accuracy_by_group"]) == {"x", "y"}
    )


def test_k_shot_prompts_show_solved_questions_of_the_same_group(tiny):
    items = [ChoiceItem(f"q{i}", ("a", "b"), i % 2, "g" if i < 3 else "h") for i in range(5)]
    mc = MultipleChoice("mc", items, _encoder(tiny), shots=2)
    text = tiny.tokenizer.decode(mc.prompts[0])
    assert "q1\nA. a\nB. b\nAnswer: B\n\nq2\n" in text and "q3" not in text and text.count("Answer:") == 3
    assert "q0" not in tiny.tokenizer.decode(mc.prompts[3]).split("q3")[0].split("about h")[1]


def test_label_choice_picks_the_likeliest_label_and_reports_macro_f1(tiny):
    enc, tok, model = _encoder(tiny), tiny.tokenizer, tiny.model
    labels = ("negative", "neutral", "positive")
    sentences = ["Profits fell.", "Sales were flat.", "Shares rose.", "Costs rose sharply."]
    picks = []
    for s in sentences:
        prompt = chat_prompt(enc, [], f"{s}\nAnswer with one of: {', '.join(labels)}.")
        lls = [
            _continuation_ll(model, prompt, [*tok(lab, add_special_tokens=False)["input_ids"], tok.eos_token_id])
            for lab in labels
        ]
        picks.append(max(range(3), key=lls.__getitem__))
    truth = [picks[0], (picks[1] + 1) % 3, picks[2], picks[3]]  # three right, one wrong
    got = LabelChoice("fin", [ChoiceItem(s, labels, t) for s, t in zip(sentences, truth, strict=True)], enc).run(
        model, 2
    )
    assert got["fin_accuracy"] == 0.75
    pred, true = [labels[p] for p in picks], [labels[t] for t in truth]
    f1 = []
    for lab in sorted(set(true)):
        tp = sum(p == t == lab for p, t in zip(pred, true, strict=True))
        fp = sum(p == lab != t for p, t in zip(pred, true, strict=True))
        fn = sum(t == lab != p for p, t in zip(pred, true, strict=True))
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert got["fin_macro_f1"] == pytest.approx(sum(f1) / len(f1))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so 3 + 4 = 7.\n#### 1,200", "1200"),
        ("The answer is $45.", "45"),
        ("-3 then 2.5", "2.5"),
        ("none", None),
        ("#### -7\nand 9 later", "-7"),
        ("It costs 1,000,000 dollars", "1000000"),
    ],
)
def test_final_number_follows_gsm8k_then_the_last_number(text, number):
    assert final_number(text) == number


def test_same_number_compares_values():
    assert same_number("1200", "1200.0") and not same_number("12", "1200") and not same_number(None, "1")


def test_answer_extraction_counts_numerically_equal_answers(tiny, monkeypatch):
    items = [AnswerItem(f"q{i}", f"work\n#### {n}") for i, n in enumerate(["1,200", "7", "3", "10"])]
    generations = ["So #### 1200", "the result is 7.", "4", "It is 10 or 11"]  # right, right, wrong, wrong (last)
    monkeypatch.setattr(generated, "score", lambda *a, **k: Scores([], [], None, generations))
    task = AnswerExtraction("gsm", items, _encoder(tiny), shots=1, chain_of_thought=True)
    assert task.run(tiny.model, 2)["gsm_accuracy"] == 0.5
    shown = tiny.tokenizer.decode(task.prompts[1])
    assert "q0\nLet's think step by step." in shown and "#### 1,200" in shown  # one solved problem, then q1


def test_rouge_l_is_the_lcs_f1(tiny, monkeypatch):
    items = [AnswerItem("p", "the cat sat on the mat", "a"), AnswerItem("p", "a b c d", "b")]
    monkeypatch.setattr(generated, "score", lambda *a, **k: Scores([], [], None, ["the cat lay on the mat", "x y"]))
    got = RougeL("dolly", items, _encoder(tiny)).run(tiny.model, 2)
    # LCS "the cat on the mat": 5 of 6 words each way -> F1 5/6; nothing shared -> 0
    assert got["dolly_rouge_l"] == pytest.approx((5 / 6 + 0) / 2)
    assert got["dolly_rouge_l_by_group"] == pytest.approx({"a": 5 / 6, "b": 0.0})


def _humaneval(tmp_path, n):
    path = tmp_path / "he.jsonl"
    rows = records("humaneval", n)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from fedtune.data.items import load_items

    return rows, load_items(str(path), DATASET_RECIPES.load("humaneval"))


def test_pass_at_1_runs_candidates_in_the_sandbox(tiny, tmp_path, monkeypatch):
    rows, items = _humaneval(tmp_path, 4)
    answers = [
        f"```python\n{rows[0]['prompt']}{rows[0]['canonical_solution']}```",  # a whole function in a block
        rows[1]["canonical_solution"],  # the body only: continues the prompt
        "    return 0\n",  # wrong
        "    while True:\n        pass\n",  # never ends: the wall clock stops it
    ]
    monkeypatch.setattr(code_kind, "score", lambda *a, **k: Scores([], [], None, answers))
    task = code_kind.PassAtK("he", items, _encoder(tiny), timeout_s=2)
    assert task.run(tiny.model, 4) == {"he_pass_at_1": 0.5}


def test_pass_at_k_is_the_closed_form_over_samples(tiny, tmp_path, monkeypatch):
    rows, items = _humaneval(tmp_path, 2)
    good = [rows[i]["canonical_solution"] for i in range(2)]
    bad = "    return None\n"
    samples = [[good[0], bad, good[0], bad], [bad, bad, bad, good[1]]]  # c = 2 and c = 1 of n = 4
    task = code_kind.PassAtK("he", items, _encoder(tiny), samples=4, k=[1, 2], timeout_s=5)
    monkeypatch.setattr(task, "_generate", lambda model, batch: samples)
    got = task.run(tiny.model, 4)
    closed = lambda n, c, k: 1 - math.comb(n - c, k) / math.comb(n, k)  # noqa: E731
    assert got["he_pass_at_1"] == pytest.approx((closed(4, 2, 1) + closed(4, 1, 1)) / 2)
    assert got["he_pass_at_2"] == pytest.approx((closed(4, 2, 2) + closed(4, 1, 2)) / 2)


def test_sampled_generation_is_seeded(tiny, tmp_path):
    _, items = _humaneval(tmp_path, 1)
    task = code_kind.PassAtK("he", items, _encoder(tiny), samples=3, max_new_tokens=4)
    first, again = task._generate(tiny.model, 2), task._generate(tiny.model, 2)
    assert first == again and len(first[0]) == 3


def test_code_blocks_are_read_out_of_the_text():
    assert code_of("Here:\n```python\nx = 1\n```\nDone") == "x = 1\n"
    assert code_of("```\ny = 2") == "y = 2" and code_of("z = 3") == "z = 3"


def test_every_kind_reports_metrics_summaries_and_comparisons_pick_up():
    names = {
        "multiple_choice": ["t_accuracy", "t_accuracy_macro"],
        "label_choice": ["t_accuracy", "t_macro_f1"],
        "answer_extraction": ["t_accuracy"],
        "sentiment_generation": ["t_accuracy", "t_macro_f1"],
        "flowertune_mmlu": ["t_accuracy", "t_accuracy_macro"],
        "flowertune_medical": ["t_accuracy"],
        "flowertune_code": ["t_pass_at_1"],
        "rouge_l": ["t_rouge_l"],
        "pass_at_k": ["t_pass_at_1", "t_pass_at_10"],
    }
    assert set(names) == set(EVAL_KINDS.names())
    assert all(BENCHMARK_METRIC.match(m) for ms in names.values() for m in ms)
    assert not BENCHMARK_METRIC.match("eval_accuracy") and not BENCHMARK_METRIC.match("t_accuracy_by_group")


def test_task_configs_refuse_what_does_not_fit_their_kind():
    with pytest.raises(ValueError, match="shots do not apply to kind 'rouge_l'"):
        EvalTaskConfig(kind="rouge_l", dataset="d.jsonl", shots=5)
    with pytest.raises(ValueError, match="gives choice items; kind 'rouge_l' scores answer items"):
        EvalTaskConfig(kind="rouge_l", dataset="d.jsonl", recipe="mmlu")
    with pytest.raises(ValueError, match="training set"):
        EvalTaskConfig(kind="rouge_l", dataset="d.jsonl", recipe="alpaca")
    with pytest.raises(ValueError, match="between 1 and samples=1"):
        EvalTaskConfig(kind="pass_at_k", dataset="d.jsonl", k=[5])
    assert EvalTaskConfig(kind="rouge_l", dataset="d.jsonl", recipe="dolly").metric_prefix() == "dolly"
    with pytest.raises(ValueError, match="needs benchmark"):
        EvalTaskConfig(kind="flowertune_medical", dataset="d.jsonl", recipe="mmlu")
    assert EvalTaskConfig(kind="flowertune_medical", dataset="d.jsonl", recipe="careqa").benchmark == "careqa"
    assert EvalTaskConfig(kind="flowertune_medical", dataset="d.jsonl", benchmark="medqa").benchmark == "medqa"


def test_a_tokenizer_that_cannot_name_letters_in_one_token_is_told_to_use_options(tiny, monkeypatch):
    items = [ChoiceItem("q", ("a", "b"), 0)]
    enc = _encoder(tiny)
    real = tiny.tokenizer.__class__.__call__

    def split_letters(self, text, **kw):  # " A" -> the letter's own two tokens, nothing in common
        out = real(self, text, **kw)
        if text in (" A", " B"):
            out["input_ids"] = [ord(text[1]), ord(text[1]) + 1]
        return out

    monkeypatch.setattr(tiny.tokenizer.__class__, "__call__", split_letters)
    with pytest.raises(ConfigError, match="use method: option"):
        MultipleChoice("mc", items, enc)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("positive", "positive"),
        ("Negative, not Positive", "positive"),
        ("negative.", "negative"),
        ("Neutral", "neutral"),
        ("I am not sure", "neutral"),
        ("NEGATIVE", "neutral"),
    ],
)
def test_fingpts_label_rule(text, label):
    from fedtune.evaluation.sentiment import fingpt_label

    assert fingpt_label(text) == label


def test_sentiment_generation_asks_fingpts_prompt_and_reads_its_labels(tiny, monkeypatch):
    from fedtune.evaluation import sentiment
    from fedtune.evaluation.sentiment import SentimentGeneration

    labels = ("negative", "neutral", "positive")
    items = [
        ChoiceItem("Profits fell.", labels, 0, "news"),
        ChoiceItem("$X flat", labels, 1, "tweet"),
        ChoiceItem("Shares rose.", labels, 2, "news"),
        ChoiceItem("Costs up.", labels, 0, "news"),
    ]
    generations = [" negative", " It is Neutral.", " positive", " positive"]  # right, right, right, wrong
    seen = {}

    def fake(model, tok, prompts, **kw):
        seen["prompts"], seen["give_up"] = prompts, kw["give_up"]
        return Scores([], [], None, generations)

    monkeypatch.setattr(sentiment, "score", fake)
    task = SentimentGeneration("fpb", items, _encoder(tiny))
    got = task.run(tiny.model, 4)
    assert got["fpb_accuracy"] == 0.75 and got["fpb_accuracy_by_group"] == {"news": 2 / 3, "tweet": 1.0}
    assert tiny.tokenizer.decode(seen["prompts"][1], skip_special_tokens=True) == (
        "Instruction: What is the sentiment of this tweet? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: $X flat\nAnswer: "
    )
    assert seen["give_up"](0, " Positive") and not seen["give_up"](0, " negative")
    with pytest.raises(ConfigError, match="use label_choice"):
        SentimentGeneration("x", [ChoiceItem("q", ("yes", "no"), 0)], _encoder(tiny))


@pytest.mark.parametrize(
    ("output", "boolean", "read"),
    [
        ("A", False, "a"),
        (" b) because", False, "b"),
        ("(C)", False, "c"),
        ("e", False, "e"),
        ("F", False, "f"),  # no letter a-e: the whole text is what is compared
        ("", False, ""),
        ("x\n## D\nmore", False, "d"),
        ("Yes.", True, "yes"),
        ("noyes", True, "no"),
        ("Maybe", True, "maybe"),  # not cleaned (FlowerTune cleans only yes/no) but equal as a whole
        ("Maybe.", True, "maybe."),  # so this one never matches "maybe"
        ("yes it is", True, "yes it is"),
    ],
)
def test_flowertunes_answer_parsing(output, boolean, read):
    from fedtune.evaluation.flowertune_qa import flowertune_answer

    assert flowertune_answer(output, boolean) == read


def test_flowertune_mmlu_writes_its_prompt_and_scores_by_category(tiny, monkeypatch):
    from fedtune.evaluation import flowertune_qa as ft

    items = [ChoiceItem("What is 2 + 2", ("3", "4"), 1, "elementary_mathematics"),
             ChoiceItem("Who wrote it?", ("x", "y"), 0, "philosophy"),
             ChoiceItem("Q.", ("x", "y"), 0, "virology")]  # fmt: skip
    assert ft.flowertune_prompt(items[0]) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: What is 2 + 2?\n\n"
        "Options:\nA. 3\nB. 4\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"
    )
    monkeypatch.setattr(ft, "score", lambda *a, **k: Scores([], [], None, ["B", "b", "A"]))
    got = ft.FlowerTuneMmlu("mmlu", items, _encoder(tiny)).run(tiny.model, 2)
    assert got["mmlu_accuracy_by_group"] == {"humanities": 0.0, "other": 1.0, "stem": 1.0}
    categories = [s for subjects in ft.CATEGORIES.values() for s in subjects]
    assert len(categories) == len(set(categories)) == 57  # MMLU's subjects, each in one category


def test_flowertune_medical_asks_each_benchmark_its_way_with_the_gold_answers_length(tiny, monkeypatch):
    from fedtune.evaluation import flowertune_qa as ft

    pub = ChoiceItem("Is it?", ("yes", "no", "maybe"), 2, context="First.\nSecond.")
    assert ft.flowertune_prompt(pub, "pubmedqa") == (
        "<|im_start|>question\n" + ft.INSTRUCTIONS["pubmedqa"] + "\nFirst.\nSecond.\nIs it?\nThe answer is:\n"
        "<|im_end|>\n<|im_start|>answer\n"
    )
    mcq = ChoiceItem("Which one", ("x", "y", "z", "w"), 3)
    assert ft.flowertune_prompt(mcq, "careqa").startswith("<|im_start|>question\nYou are a medical doctor answering")
    assert "\nQuestion: Which one?\n\nOptions:\nA. x\nB. y\nC. z\nD. w\nThe answer is:\n" in ft.flowertune_prompt(
        mcq, "medqa"
    )
    seen = []

    def fake(model, tok, prompts, batch_size, max_new_tokens):  # "maybe" for every prompt
        seen.append((len(prompts), max_new_tokens))
        return Scores([], [], None, ["maybe"] * len(prompts))

    monkeypatch.setattr(ft, "score", fake)
    golds = [("maybe", 2)] + [("yes", 0)] * 16 + [("maybe", 2)]  # batches of 16 led by "maybe", then "yes"
    items = [ChoiceItem("q", ("yes", "no", "maybe"), a, context="c") for _, a in golds]
    got = ft.FlowerTuneMedical("pubmedqa", items, _encoder(tiny), "pubmedqa").run(tiny.model, 4)
    assert got["pubmedqa_accuracy"] == pytest.approx(2 / 18)
    tok = tiny.tokenizer
    lengths = {len(tok(w, add_special_tokens=False)["input_ids"]) for w in ("maybe", "yes")}
    budget = {n for _, n in seen}
    assert budget == lengths and sum(n for n, _ in seen) == 18  # each batch's budget: its first gold's tokens
    with pytest.raises(ValueError, match="benchmark must be one of"):
        ft.FlowerTuneMedical("x", items, _encoder(tiny), None)
