"""Instruction data in the Alpaca layout, tokenised with the prompt masked out of the loss.

The layout (``instruction``, ``input``, ``output``) is that of the LLM-Adapters commonsense and
math sets the SMT paper trains on; the template below is theirs (Alpaca's). A record becomes
``prompt + output + eos``; labels are ``-100`` over the prompt, so only the response is learned.

Batches come in a fixed order that depends only on the seed, the epoch and the rank, so a resumed
run can skip exactly the micro-batches it has already seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smt_dist.files.model_dir import require_model_dir

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt for a record: everything the model sees before its response."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def read_records(path: str | Path) -> list[dict[str, str]]:
    """Read a ``.json`` array or ``.jsonl`` file of Alpaca records, checking every one.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line
    of the first malformed record, or saying the file holds no records.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Data file {path} is a directory; give a .json or .jsonl file.")
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({err.reason}).") from err
    located: list[tuple[int, Any]] = []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        located = _array_items(text, path)
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    located.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
    records = [_checked_record(item, f"{path}:{lineno}") for lineno, item in located]
    if not records:
        raise ValueError(f"{path} holds no records.")
    return records


def _array_items(text: str, path: Path) -> list[tuple[int, Any]]:
    """The items of a JSON array with the line each starts on (decoded one by one, so braces
    inside strings cannot shift the count)."""
    decoder = json.JSONDecoder()

    def line_at(position: int) -> int:
        return text.count("\n", 0, position) + 1

    def skip(position: int) -> int:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        return position

    position = skip(0)
    if not text.startswith("[", position):
        raise ValueError(f"{path}: a .json data file must hold a list of records.")
    position = skip(position + 1)
    items: list[tuple[int, Any]] = []
    if text.startswith("]", position):
        return items
    while True:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from err
        items.append((line_at(position), item))
        position = skip(end)
        if text.startswith(",", position):
            position = skip(position + 1)
        elif text.startswith("]", position):
            break
        else:
            raise ValueError(f"{path}:{line_at(position)}: not valid JSON (expected ',' or ']').")
    if text[position + 1 :].strip():
        raise ValueError(f"{path}:{line_at(position + 1)}: not valid JSON (text after the list).")
    return items


def _checked_record(item: Any, where: str) -> dict[str, str]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(item).__name__}.")
    for key in ("instruction", "output"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise ValueError(f"{where}: the record lacks a non-empty string field '{key}'.")
    if not isinstance(item.get("input", ""), str):
        raise ValueError(f"{where}: the field 'input' must be a string.")
    return {"instruction": item["instruction"], "input": item.get("input", ""), "output": item["output"]}


def tokenize_records(
    records: list[dict[str, str]], tokenizer: Any, *, max_seq_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels per record, truncated to ``max_seq_length``.

    Returns the examples and how many records were dropped because their prompt alone filled
    ``max_seq_length`` (they would carry no loss).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; the response needs one to end.")
    examples, dropped = [], 0
    for record in records:
        prompt = tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        ids = (prompt + response + [tokenizer.eos_token_id])[:max_seq_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id])[:max_seq_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise ValueError(
            f"Every record's prompt fills max_seq_length={max_seq_length}; nothing is left to learn."
        )
    return examples, dropped


def hold_out(examples: list[dict], size: int, *, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off ``size`` examples, chosen by a seeded permutation, as a validation set.

    Returns ``(train, validation)``; both keep the file's order.
    """
    if not 0 < size < len(examples):
        raise ValueError(
            f"--val_set_size {size} must be between 1 and the {len(examples)} usable training records minus one."
        )
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:size].tolist())
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def collate(examples: list[dict[str, list[int]]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class BatchOrder:
    """Which examples each rank's micro-batches hold, epoch by epoch, from the seed alone."""

    num_examples: int
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (the ragged tail is dropped so ranks stay in step)."""
        return self.num_examples // (self.micro_batch_size * self.world_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch, as lists of example indices."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        mine = order[self.rank :: self.world_size]
        size = self.micro_batch_size
        return [mine[i * size : (i + 1) * size] for i in range(self.batches_per_epoch)]

    def stream(self, start: int = 0):
        """Micro-batches from the ``start``-th on, across epochs, forever: ``(epoch, indices)``."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            for indices in self.epoch(epoch)[skip:]:
                yield epoch, indices
            epoch, skip = epoch + 1, 0


def load_tokenizer(model_dir: Path):
    """The model directory's tokenizer, with a pad token (the eos token if it has none)."""
    from transformers import AutoTokenizer

    require_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load a tokenizer from {model_dir}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
