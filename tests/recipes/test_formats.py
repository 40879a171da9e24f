"""Every data layout to ids and labels, on hand-written records, against hand-built expectations."""

from __future__ import annotations

import json

import pytest
from paths import DATA, MODEL, REPO

from smt_dist.recipes.data import format_prompt, load_tokenizer, read_dataset, read_records, tokenize_records
from smt_dist.recipes.formats import IGNORE_INDEX, checked_record, detect_format

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the fox?"},
    {"role": "assistant", "content": "The fox is red."},
    {"role": "user", "content": "And the owl?"},
    {"role": "assistant", "content": "Grey."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def one(tokenizer, record, fmt, **kwargs):
    (example,), dropped = tokenize_records(
        [checked_record(record, fmt, "test")], tokenizer, max_seq_length=512, dataset_format=fmt, **kwargs
    )
    assert dropped == 0
    return example["input_ids"], example["labels"]


def test_alpaca_is_todays_template_and_mask(tokenizer):
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    got_ids, got_labels = one(tokenizer, record, "alpaca")
    prompt = ids(tokenizer, format_prompt(record), special=True)
    response = [*ids(tokenizer, "5"), tokenizer.eos_token_id]
    assert got_ids == prompt + response and got_labels == [IGNORE_INDEX] * len(prompt) + response


def test_prompt_completion_learns_the_completion(tokenizer):
    got_ids, got_labels = one(tokenizer, {"prompt": "Q: 2 + 3?\nA:", "completion": " 5"}, "prompt_completion")
    prompt = ids(tokenizer, "Q: 2 + 3?\nA:", special=True)
    completion = [*ids(tokenizer, " 5"), tokenizer.eos_token_id]
    assert got_ids == prompt + completion and got_labels == [IGNORE_INDEX] * len(prompt) + completion


def test_text_learns_every_token(tokenizer):
    got_ids, got_labels = one(tokenizer, {"text": "The fox is red."}, "text")
    assert got_ids == [*ids(tokenizer, "The fox is red.", special=True), tokenizer.eos_token_id] == got_labels


def test_messages_learn_the_assistant_turns_only(tokenizer):
    got_ids, got_labels = one(tokenizer, {"messages": CHAT}, "messages")
    # The shipped template, written out by hand: bos, system line, "User: ...", "Assistant:" + turn + eos
    eos = [tokenizer.eos_token_id]
    parts = [
        (
            [
                tokenizer.bos_token_id,
                *ids(tokenizer, "Be brief.\n\nUser: What color is the fox?\nAssistant:"),
            ],
            False,
        ),
        (ids(tokenizer, " The fox is red.") + eos, True),
        (ids(tokenizer, "\nUser: And the owl?\nAssistant:"), False),
        (ids(tokenizer, " Grey.") + eos, True),
        (ids(tokenizer, "\n"), False),
    ]
    assert got_ids == [t for part, _ in parts for t in part]
    assert got_labels == [t if learned else IGNORE_INDEX for part, learned in parts for t in part]
    all_ids, all_labels = one(tokenizer, {"messages": CHAT}, "messages", assistant_only_loss=False)
    assert all_ids == got_ids == all_labels


def test_sharegpt_is_the_same_conversation(tokenizer):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]}
    assert one(tokenizer, sharegpt, "sharegpt") == one(tokenizer, {"messages": CHAT}, "messages")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"messages": CHAT}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "a"}, "text"),
    ],
)
def test_detection(record, fmt):
    assert detect_format(record, "x") == fmt


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"messages": CHAT[:2]}, "messages", "has no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "unknown role 'robot'"),
        ({"conversations": [{"from": "gpt"}]}, "sharegpt", "must be an object with a string 'value'"),
        ({"prompt": "a"}, "prompt_completion", "lacks a non-empty string field 'completion'"),
    ],
)
def test_bad_records_name_the_record(record, fmt, message):
    with pytest.raises(ValueError, match=f"^data.jsonl:3: .*{message}"):
        checked_record(record, fmt, "data.jsonl:3")


def test_undetectable_format_says_which_fields():
    with pytest.raises(ValueError, match=r"cannot tell the data format from the fields \['question'\]"):
        detect_format({"question": "a"}, "data.jsonl:1")


def test_a_template_without_generation_markers_is_refused(tokenizer, tmp_path):
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tokenizer = load_tokenizer(MODEL)
    tokenizer.chat_template = plain
    with pytest.raises(ValueError, match="no {% generation %} markers"):
        one(tokenizer, {"messages": CHAT}, "messages")
    assert one(tokenizer, {"messages": CHAT}, "messages", assistant_only_loss=False)


def test_files_in_every_layout_read_alike(tmp_path):
    import datasets

    records = read_records(DATA)[:20]
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.to_csv(str(tmp_path / "data.csv"), index=False)
    (tmp_path / "data.json").write_text(json.dumps(records))
    for name in ("data.parquet", "data.csv", "data.json"):
        assert read_dataset(tmp_path / name) == (records, "alpaca"), name
    chat, fmt = read_dataset(REPO / "data" / "tiny_chat.jsonl")
    assert fmt == "messages" and all(m["messages"][-1]["role"] == "assistant" for m in chat)


def test_a_parquet_file_without_the_columns_names_the_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "a", "answer": "b"}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match=r"d.parquet:row 1: cannot tell the data format"):
        read_dataset(tmp_path / "d.parquet")
    with pytest.raises(
        ValueError, match=r"d.parquet:row 1: the record lacks a non-empty string field 'instruction'"
    ):
        read_dataset(tmp_path / "d.parquet", "alpaca")


def test_a_packed_row_loses_what_its_examples_lose_one_by_one(tokenizer):
    # The shipped model, fp32: the packed row runs one forward over all examples under the
    # block-diagonal mask transformers builds from position_ids; the same sums in another order.
    import torch
    from transformers import AutoModelForCausalLM

    from smt_dist.recipes.data import collate, pack_examples

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    model.config.use_cache = False
    chat, fmt = read_dataset(REPO / "data" / "tiny_chat.jsonl")
    examples, _ = tokenize_records(chat[:12], tokenizer, max_seq_length=128, dataset_format=fmt)
    rows = pack_examples(examples, max_seq_length=256)
    assert 1 < len(rows) < len(examples) and all(len(r["input_ids"]) <= 256 for r in rows)

    def summed_loss(batch):
        with torch.no_grad():
            out = model(**batch)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return out.loss * tokens, tokens

    packed = [summed_loss(collate(rows, pad_token_id=tokenizer.pad_token_id))]
    single = [summed_loss(collate([e], pad_token_id=tokenizer.pad_token_id)) for e in examples]
    assert packed[0][1] == sum(t for _, t in single)
    torch.testing.assert_close(packed[0][0], sum(loss for loss, _ in single), rtol=1e-5, atol=1e-4)
    # without position_ids the examples would see each other: the loss differs
    crossed = collate(rows, pad_token_id=tokenizer.pad_token_id)
    del crossed["position_ids"]
    assert (summed_loss(crossed)[0] - packed[0][0]).abs() > 1e-2
