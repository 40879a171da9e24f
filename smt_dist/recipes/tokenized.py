"""Tokenised examples as a cached Arrow dataset, made once per node and shared by its ranks.

The first rank of a node to take the cache file's lock tokenises (a ``datasets`` ``map``, over
``--dataset_num_proc`` processes) and writes ``tokenized-<key>.arrow``; the node's other ranks
wait on the lock and memory-map that file, so its pages sit once in the page cache whatever the
number of ranks. The key is a digest of everything the ids depend on: the records, the tokenizer
(vocabulary, special tokens, chat template), the format, ``max_seq_length``, the loss mask and
this code, so a cache can never answer for other data. The cache lives under
``$HF_DATASETS_CACHE`` (default ``~/.cache/huggingface/datasets``) in ``smt_dist/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from smt_dist.recipes import formats
from smt_dist.recipes.formats import IGNORE_INDEX, tokenize_record


def tokenized_dataset(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_seq_length: int,
    dataset_format: str,
    assistant_only_loss: bool = True,
    num_proc: int | None = None,
    source: str = "",
):
    """The records tokenised and truncated, as a ``datasets.Dataset`` of ``input_ids``/``labels``.

    Returns the dataset and how many records were dropped because truncation left them no token
    with a loss. Records keep their order. Raises ``ValueError`` naming the record (in
    ``source``, the data's path) a template or format cannot tokenise, or when nothing is left to
    learn.
    """
    import datasets
    from filelock import FileLock

    check_tokenizer(tokenizer)
    options = (dataset_format, max_seq_length, assistant_only_loss)
    key = _key(records, tokenizer, options, num_proc)
    cache = _cache_dir() / f"tokenized-{key}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for i in batch["index"]:
            example = tokenize_one(records[i], i, tokenizer, *options, source=source)
            if example is not None:
                out["input_ids"].append(example["input_ids"])
                out["labels"].append(example["labels"])
        return out

    indices = datasets.Dataset.from_dict({"index": list(range(len(records)))})
    # One rank per node tokenises; the others read its file. No progress bar: the job logs, and
    # a bar on every rank's stderr would bury an error's one sentence.
    with FileLock(str(cache) + ".lock"), _no_progress_bars():
        examples = indices.map(
            tokenize,
            batched=True,
            remove_columns=["index"],
            num_proc=num_proc,
            cache_file_name=str(cache),
            new_fingerprint=key,
            load_from_cache_file=True,
            desc="Tokenizing",
        )
    check_something_left(len(examples), max_seq_length)
    return examples, len(records) - len(examples)


def check_tokenizer(tokenizer: Any) -> None:
    """Every response ends in the eos token: a tokenizer without one cannot tokenise."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; the response needs one to end.")


def check_something_left(count: int, max_seq_length: int) -> None:
    """Refuse data whose every record lost all its labels to truncation."""
    if count == 0:
        raise ValueError(
            f"Every record's prompt fills max_seq_length={max_seq_length}; nothing is left to learn."
        )


def tokenize_one(
    record: dict[str, Any],
    index: int,
    tokenizer: Any,
    dataset_format: str,
    max_seq_length: int,
    assistant_only_loss: bool,
    *,
    source: str = "",
) -> dict[str, list[int]] | None:
    """One record's ids and labels, truncated; ``None`` when truncation leaves no label."""
    where = f"{source}: record {index + 1}" if source else f"record {index + 1}"
    ids, labels = tokenize_record(
        record, dataset_format, tokenizer, assistant_only_loss=assistant_only_loss, where=where
    )
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def hold_out(examples, size: int, *, seed: int):
    """Split off ``size`` examples as a validation set: ``datasets``' ``train_test_split`` with the seed.

    Returns ``(train, validation)``.
    """
    if not 0 < size < len(examples):
        raise ValueError(
            f"--val_set_size {size} must be between 1 and the {len(examples)} usable training records minus one."
        )
    split = examples.train_test_split(test_size=size, seed=seed)
    return split["train"], split["test"]


def _key(records: list[dict[str, Any]], tokenizer: Any, options: tuple, num_proc: int | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(records, sort_keys=True, default=str).encode())
    vocabulary = (
        tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(tokenizer.get_vocab())
    )
    digest.update(vocabulary.encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token]).encode())
    digest.update(json.dumps([*options, num_proc]).encode())
    for module in (formats, tokenize_one):  # a change to how records become ids is a new key
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def _no_progress_bars():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _cache_dir() -> Path:
    root = os.environ.get("HF_DATASETS_CACHE") or Path.home() / ".cache" / "huggingface" / "datasets"
    return Path(root) / "smt_dist"
