"""The job's data path: directories of files, the cached tokenisation a node shares, the hold-out.

References: ``tokenize_records``, the one-process loop over the same per-record function, and
the files read one by one.
"""

from __future__ import annotations

import json
import multiprocessing

import pytest
from paths import DATA, MODEL, REPO

from smt_dist.recipes import tokenized
from smt_dist.recipes.data import data_digest, load_tokenizer, read_dataset, tokenize_records
from smt_dist.recipes.tokenized import hold_out, tokenized_dataset

CHAT = REPO / "data" / "tiny_chat.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rows(dataset) -> list[dict]:
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]


@pytest.mark.parametrize("num_proc", [None, 2])
@pytest.mark.parametrize("path", [DATA, CHAT], ids=["alpaca", "messages"])
def test_the_cached_map_gives_the_one_process_examples(tokenizer, path, num_proc):
    records, fmt = read_dataset(path)
    expected, dropped = tokenize_records(records, tokenizer, max_seq_length=64, dataset_format=fmt)
    got, got_dropped = tokenized_dataset(
        records, tokenizer, max_seq_length=64, dataset_format=fmt, num_proc=num_proc
    )
    assert rows(got) == expected and got_dropped == dropped


def counting_tokenize_one(counter_path):
    """``tokenize_one`` that appends one line per call to a file (shared across processes)."""
    original = tokenized.tokenize_one

    def count(*args, **kwargs):
        with open(counter_path, "a") as handle:
            handle.write("x\n")
        return original(*args, **kwargs)

    return count


def tokenize_in_a_process(counter_path, cache_dir, out_path) -> None:
    import os

    os.environ["HF_DATASETS_CACHE"] = str(cache_dir)
    tokenized.tokenize_one = counting_tokenize_one(counter_path)
    records, fmt = read_dataset(CHAT)
    examples, _ = tokenized_dataset(records, load_tokenizer(MODEL), max_seq_length=64, dataset_format=fmt)
    out_path.write_text(json.dumps(rows(examples)))


def test_ranks_of_a_node_tokenise_once_and_share_the_result(tmp_path, cache):
    """Two processes started together, as two ranks are: one tokenises, the other reads its file."""
    counter = tmp_path / "calls"
    context = multiprocessing.get_context("fork")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [context.Process(target=tokenize_in_a_process, args=(counter, cache, out)) for out in outs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    records, _ = read_dataset(CHAT)
    assert len(counter.read_text().splitlines()) == len(records)  # once, not once per process
    assert json.loads(outs[0].read_text()) == json.loads(outs[1].read_text())


def test_a_change_that_changes_ids_is_a_new_cache_entry(tokenizer, cache):
    records, fmt = read_dataset(CHAT)
    first, _ = tokenized_dataset(records, tokenizer, max_seq_length=64, dataset_format=fmt)
    shorter, _ = tokenized_dataset(records, tokenizer, max_seq_length=32, dataset_format=fmt)
    everything, _ = tokenized_dataset(
        records, tokenizer, max_seq_length=64, dataset_format=fmt, assistant_only_loss=False
    )
    assert max(len(r["input_ids"]) for r in shorter) <= 32 < max(len(r["input_ids"]) for r in first)
    assert rows(everything) != rows(first)
    assert len(list(cache.glob("smt_dist/tokenized-*.arrow"))) == 3


def test_the_hold_out_is_seeded_and_disjoint(tokenizer):
    records, fmt = read_dataset(DATA)
    examples, _ = tokenized_dataset(records, tokenizer, max_seq_length=64, dataset_format=fmt)
    train, held = hold_out(examples, 20, seed=7)
    again_train, again_held = hold_out(examples, 20, seed=7)
    assert len(held) == 20 and len(train) == len(examples) - 20
    assert rows(held) == rows(again_held) and rows(train) == rows(again_train)
    assert rows(hold_out(examples, 20, seed=8)[1]) != rows(held)
    everything = sorted(json.dumps(r) for r in rows(examples))
    assert sorted(json.dumps(r) for r in rows(train) + rows(held)) == everything
    with pytest.raises(ValueError, match="--val_set_size 0 must be between 1 and"):
        hold_out(examples, 0, seed=7)


def test_a_directory_reads_as_its_files_in_name_order(tmp_path):
    lines = DATA.read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "a.jsonl").write_text("\n".join(lines[5:12]) + "\n")
    (tmp_path / "notes.txt").write_text("not data")
    records, fmt = read_dataset(tmp_path)
    a, _ = read_dataset(tmp_path / "a.jsonl")
    b, _ = read_dataset(tmp_path / "b.jsonl")
    assert fmt == "alpaca" and records == a + b
    digest = data_digest(tmp_path, records)
    (tmp_path / "a.jsonl").rename(tmp_path / "c.jsonl")  # same bytes, another order
    assert data_digest(tmp_path, records) != digest
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mixes .jsonl, .parquet files; keep one kind per directory"):
        read_dataset(tmp_path)


def test_a_bad_record_in_a_directory_names_its_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "b.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: .*'output'"):
        read_dataset(tmp_path)
