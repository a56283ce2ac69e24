import pytest
import torch

from fedtune.evaluation.scoring import score, shared_prefix


def _reference(model, prompt, cont, candidates, new_tokens):
    """One row alone, no padding, no cache: (log-likelihood, candidate log-probs, greedy token ids)."""
    ids = torch.tensor([[*prompt, *cont]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
        ll = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont))
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=2,
        )
    return ll, logp[len(prompt) - 1, candidates].tolist(), out[0, len(prompt) :].tolist()


def _rows(tok):
    head = tok("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\n")["input_ids"]
    bodies = [
        "What is 2+2?",
        "Name a colour that is warm and bright.",
        "x",
        "Sort 3 1 2 and 9 8 7 6 5 4, then say that you are done.",
    ]
    prompts = [head + tok(b)["input_ids"] for b in bodies]
    conts = [tok(c)["input_ids"] for c in ["4", "orange, like a sunset", "y", ""]]  # longest prompt: no continuation
    return head, prompts, conts


@pytest.mark.parametrize(("batch_size", "cached"), [(1, True), (3, True), (4, True), (4, False)])
def test_rows_score_and_generate_as_each_row_alone(tiny_adapter, tiny, batch_size, cached):
    model = tiny_adapter.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a LoRA that changes the outputs
    tok = tiny.tokenizer
    head, prompts, conts = _rows(tok)
    assert shared_prefix(prompts) >= len(head) - 1  # the system turn is shared
    cand = [5, 17, 40]
    got = score(
        model, tok, prompts, conts, batch_size=batch_size, candidates=cand, max_new_tokens=5, cache_prompts=cached
    )
    for i, (pr, co) in enumerate(zip(prompts, conts, strict=True)):
        ll, choice, gen = _reference(model, pr, co, cand, 5)
        assert got.log_likelihood[i] == pytest.approx(ll, abs=1e-4) and got.tokens[i] == len(co)
        assert got.choices[i] == pytest.approx(choice, abs=1e-4)
        assert got.generations[i] == tok.decode(gen, skip_special_tokens=True)


def test_prompt_learning_takes_the_plain_path_with_the_same_numbers(tiny):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny.model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    tok = tiny.tokenizer
    _, prompts, conts = _rows(tok)
    got = score(model, tok, prompts, conts, batch_size=4, candidates=[5, 9])
    alone = [score(model, tok, [p], [c], batch_size=1, candidates=[5, 9]) for p, c in zip(prompts, conts, strict=True)]
    assert got.log_likelihood == pytest.approx([a.log_likelihood[0] for a in alone], abs=1e-4)
    assert [c for c in got.choices] == [pytest.approx(a.choices[0], abs=1e-4) for a in alone]


def test_shared_prefix_leaves_every_prompt_a_token():
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[7], [7, 8]]) == 0
    assert shared_prefix([[1, 2], [3, 4]]) == 0


@pytest.mark.parametrize("cached", [True, False])
def test_a_row_given_up_stops_where_its_full_generation_went_on(tiny, cached):
    tok = tiny.tokenizer
    _, prompts, _ = _rows(tok)
    full = score(tiny.model, tok, prompts, batch_size=4, max_new_tokens=8, cache_prompts=cached).generations
    cut = score(
        tiny.model,
        tok,
        prompts,
        batch_size=4,
        max_new_tokens=8,
        cache_prompts=cached,
        give_up=lambda i, text: i % 2 == 0 and len(text) >= 2,
    ).generations
    for i, (f, c) in enumerate(zip(full, cut, strict=True)):
        assert f.startswith(c) and (c == f if i % 2 else len(c) < len(f) and len(c) >= 2)


def test_runs_of_prompts_sharing_more_get_their_own_prefix():
    from fedtune.evaluation.scoring import prefix_groups

    a, b = [1] * 2 + [5] * 30, [1] * 2 + [6] * 30  # two families sharing 2 tokens, then 30 of their own
    prompts = sorted([[*a, 7], [*a, 8, 9], [*b, 7], [*b, 8]])
    assert prefix_groups(prompts) == [(0, 2, 32), (2, 4, 32)]
    assert prefix_groups([[1, 2, 3], [1, 2, 4]]) == [(0, 2, 2)]  # one run: nothing to gain from splitting
    assert prefix_groups([[4]]) == [(0, 1, 0)]


@pytest.mark.parametrize("batch_size", [2, 4, 5])
def test_families_of_prompts_score_and_generate_as_each_row_alone(tiny, batch_size):
    tok, model = tiny.tokenizer, tiny.model
    head = tok("<|im_start|>system\nShort answers.<|im_end|>\n<|im_start|>user\n")["input_ids"]
    shots = {f: tok(f"Examples about {f}: one, two, three, four, five, six, seven.\n")["input_ids"]
             for f in ("apples", "rivers")}  # fmt: skip
    prompts = [head + shots[f] + tok(q)["input_ids"] for f in shots for q in ("First?", "And the second one?", "3")]
    conts = [tok(c)["input_ids"] for c in ("yes", "no", "a b c", "", "x", "long answer here")]
    got = score(model, tok, prompts, conts, batch_size=batch_size, candidates=[5, 9], max_new_tokens=4)
    for i, (pr, co) in enumerate(zip(prompts, conts, strict=True)):
        ll, choice, gen = _reference(model, pr, co, [5, 9], 4)
        assert got.log_likelihood[i] == pytest.approx(ll, abs=1e-4)
        assert got.choices[i] == pytest.approx(choice, abs=1e-4)
        assert got.generations[i] == tok.decode(gen, skip_special_tokens=True)


@pytest.mark.parametrize("taken", [0, 2, 5, 9])
def test_a_continuation_on_the_greedy_path_is_read_off_the_forward(tiny_adapter, tiny, taken):
    """Greedy text equals generate's whether the continuation follows the greedy path for none, some or all of
    its tokens; where it covers every new token (or ends at EOS) no decoding step runs."""
    model = tiny_adapter.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tok = tiny.tokenizer
    _, prompts, _ = _rows(tok)
    greedy = [_reference(model, pr, [], [0], 6)[2] for pr in prompts]
    conts = [g[:taken] + [7] * (i % 2) for i, g in enumerate(greedy)]  # odd rows then leave the greedy path
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = score(model, tok, prompts, conts, batch_size=4, max_new_tokens=6)
    finally:
        hook.remove()
    assert got.generations == [tok.decode(g, skip_special_tokens=True) for g in greedy]
    covered = all(len(g) <= taken + 1 for g in greedy)  # each row's last new token is read after its draft
    assert (len(calls) == 2) == covered  # 2: the shared prefix and the rows, nothing decoded
    assert taken not in (0, 9) or covered == (taken == 9)  # both paths run: nothing covered at 0, all at 9
