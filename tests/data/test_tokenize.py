from fedtune.data.formats import from_instruction
from fedtune.data.templates import resolve_template
from fedtune.data.tokenize import IGNORE, Encoder, collate
from fedtune.models.tiny import build_byte_tokenizer

TOK = build_byte_tokenizer()
EX = from_instruction("Compute.", "85", "47 + 38")


def test_loss_only_on_target_and_eos():
    enc = Encoder(TOK, "chat", None, 256)
    e, truncated = enc.encode(EX)
    batch = collate([e], TOK.pad_token_id)
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE].tolist()
    assert not truncated
    assert TOK.decode(kept[:-1]) == "85" and kept[-1] == TOK.eos_token_id
    assert (labels[: e.prompt_len] == IGNORE).all()


def test_train_on_prompt_labels_everything():
    e, _ = Encoder(TOK, "chat", None, 256, train_on_prompt=True).encode(EX)
    labels = collate([e], TOK.pad_token_id)["labels"][0]
    assert (labels != IGNORE).all()


def test_generation_prompt_is_the_training_prefix():
    enc = Encoder(TOK, "chat", "Be brief.", 256)
    e, _ = enc.encode(EX)
    assert list(e.input_ids[: e.prompt_len]) == enc.encode_prompt(EX)
    assert TOK.decode(enc.encode_prompt(EX)).endswith("<|im_start|>assistant\n")
    assert "Be brief." in TOK.decode(enc.encode_prompt(EX))


def test_truncation_keeps_target_and_drops_prompt_start():
    e, truncated = Encoder(TOK, "chat", None, 20).encode(EX)
    assert truncated and len(e.input_ids) == 20
    assert TOK.decode(e.input_ids[e.prompt_len : -1]) == "85"


def test_padding_is_masked():
    enc = Encoder(TOK, "alpaca", None, 256)
    short, _ = enc.encode(from_instruction("x", "1"))
    long, _ = enc.encode(EX)
    b = collate([short, long], TOK.pad_token_id)
    n = len(short.input_ids)
    assert b["attention_mask"][0, n:].sum() == 0 and (b["labels"][0, n:] == IGNORE).all()
    assert b["input_ids"].shape == (2, len(long.input_ids))


def test_template_resolution():
    assert resolve_template("auto", TOK) == "chat"
    plain = build_byte_tokenizer()
    plain.chat_template = None
    assert resolve_template("auto", plain) == "alpaca"
    assert "### Response:\n" in Encoder(plain, "alpaca", None, 256).tokenizer.decode(
        Encoder(plain, "alpaca", None, 256).encode_prompt(EX)
    )
