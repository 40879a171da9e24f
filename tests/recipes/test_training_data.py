"""Alpaca data: errors name file and line, prompts are masked, batch order resumes exactly."""

from __future__ import annotations

import json

import pytest
from paths import MODEL as DEFAULT_MODEL
from transformers import AutoTokenizer

from smt_dist.recipes.data import (
    IGNORE_INDEX,
    BatchOrder,
    collate,
    format_prompt,
    read_records,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.jsonl",
            '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"\n',
            r"bad.jsonl:3: not valid JSON",
        ),
        (
            "miss.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
            r"miss.jsonl:2: .*'output'",
        ),
        (
            "list.json",
            '[\n {"instruction": "a", "output": "b"},\n {"output": "b"}\n]',
            r"list.json:3: .*'instruction'",
        ),
        ("type.jsonl", '["not", "a", "record"]\n', r"type.jsonl:1: a record must be a JSON object"),
        ("empty.jsonl", "\n\n", r"empty.jsonl holds no records"),
        ("obj.json", '{"instruction": "a"}', r"obj.json: a .json data file must hold a list"),
        (
            "braces.json",  # braces inside strings must not shift the line count
            '[\n {"instruction": "{{{", "output": "}"},\n {"instruction": "}}", "output": "{"},\n {"output": "b"}\n]',
            r"braces.json:4: .*'instruction'",
        ),
        ("unclosed.json", '[\n {"instruction": "a", "output": "b"}\n', r"unclosed.json:\d+: not valid JSON"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        read_records(write(tmp_path / name, text))


def test_text_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 text"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl does not exist"):
        read_records(tmp_path / "nothing.jsonl")


def test_prompt_is_masked_and_response_ends_with_eos(tmp_path, tokenizer):
    record = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}
    (example,), dropped = tokenize_records([record], tokenizer, max_seq_length=512)
    prompt_ids = tokenizer(format_prompt(record))["input_ids"]
    assert dropped == 0
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned[:-1]) == "5"


def test_truncation_and_prompt_only_records(tokenizer):
    records = [{"instruction": "Say something long.", "input": "", "output": "word " * 50}]
    (example,), _ = tokenize_records(records, tokenizer, max_seq_length=60)
    assert len(example["input_ids"]) == len(example["labels"]) == 60
    with pytest.raises(ValueError, match="Every record's prompt fills max_seq_length=10"):
        tokenize_records(records, tokenizer, max_seq_length=10)


def test_collate_pads_right_and_ignores_padding():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_batch_order_shards_disjointly_and_resumes_mid_stream():
    orders = [BatchOrder(50, 4, rank, 2, seed=3) for rank in range(2)]
    assert orders[0].batches_per_epoch == 6
    seen = [i for order in orders for batch in order.epoch(0) for i in batch]
    assert len(seen) == len(set(seen)) == 48
    full = orders[0].stream(0)
    stream = [next(full) for _ in range(15)]
    resumed = orders[0].stream(9)
    assert [next(resumed) for _ in range(6)] == stream[9:]
    assert orders[0].epoch(1) != orders[0].epoch(0)


def test_embedded_dataset_is_well_formed(tokenizer):
    path = DEFAULT_MODEL.parents[1] / "data" / "tiny_instruct.jsonl"
    records = read_records(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(lines) > 0
    assert records == [{"input": "", **line} for line in lines]  # every field read as written
    # the evaluation splits are held out: no test or validation question is in the training file
    trained = {r["instruction"] for r in records}
    for split in sorted((path.parent / "tiny_eval").glob("*/*.json")):
        held = {r["instruction"] for r in json.loads(split.read_text())}
        assert held and not held & trained, split
