"""Training data: files read and checked, records tokenised, batches in a fixed order.

A data file (JSON, JSONL, parquet, CSV) holds records in one of the layouts of
``smt_dist.recipes.formats`` (Alpaca, the layout of the LLM-Adapters sets the SMT paper trains on,
conversations, prompt/completion, plain text); each becomes token ids and labels with ``-100``
wherever nothing is learned.

Batches come in a fixed order that depends only on the seed, the epoch and the rank, so a resumed
run can skip exactly the micro-batches it has already seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smt_dist.files.model_dir import require_model_dir
from smt_dist.recipes.formats import (  # noqa: F401  # format_prompt: the Alpaca prompt, also named here
    IGNORE_INDEX,
    checked_record,
    detect_format,
    format_prompt,
)
from smt_dist.recipes.tokenized import check_something_left, check_tokenizer, tokenize_one


def read_records(path: str | Path) -> list[dict[str, str]]:
    """Read a ``.json`` array or ``.jsonl`` file of Alpaca records, checking every one."""
    return read_dataset(path, "alpaca")[0]


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def read_dataset(
    path: str | Path, dataset_format: str = "auto", *, split: str = "train"
) -> tuple[list[dict[str, Any]], str]:
    """Read records and their format from a data file, a directory of them, or the hub.

    A file is a ``.json`` array, ``.jsonl``, ``.parquet`` or ``.csv``; a directory's data files
    are read in name order, as one dataset; a path that does not exist but reads as a hub name
    (``owner/name``) is loaded with ``datasets.load_dataset(name, split=split)``.
    ``dataset_format`` ``auto`` reads the layout from the first record; every record is then
    checked against it (``smt_dist.recipes.formats``). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` naming the file and line (or row) of the first malformed record, or
    saying the data holds no records.
    """
    path = Path(path)
    if path.is_dir():
        files = data_files(path)
        located = [(f"{file}:{where}", item) for file in files for where, item in _located(file)]
    elif path.is_file():
        located = [(f"{path}:{where}", item) for where, item in _located(path)]
    elif _hub_name(path):
        located = _hub_rows(str(path), split)
    else:
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if not located:
        raise ValueError(f"{path} holds no records.")
    if dataset_format == "auto":
        dataset_format = detect_format(located[0][1], located[0][0])
    return [checked_record(item, dataset_format, where) for where, item in located], dataset_format


def data_files(directory: Path) -> list[Path]:
    """A data directory's files, in name order; all of one kind, so one layout can hold."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise ValueError(f"{directory} holds no {', '.join(DATA_SUFFIXES)} files.")
    kinds = {".jsonl" if p.suffix == ".json" else p.suffix for p in files}
    if len(kinds) > 1:
        raise ValueError(f"{directory} mixes {', '.join(sorted(kinds))} files; keep one kind per directory.")
    return files


def data_digest(path: str | Path, records: list[dict[str, Any]]) -> str:
    """What identifies the training data, by content: a local file's bytes (a directory's files'
    names and bytes), else the records themselves (a hub dataset)."""
    path, digest = Path(path), hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
    elif path.is_dir():
        for file in data_files(path):
            content = file.read_bytes()
            digest.update(f"{file.name}\0{len(content)}\0".encode() + content)
    else:
        digest.update(json.dumps(records, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _located(path: Path) -> list[tuple[Any, Any]]:
    if path.suffix not in DATA_SUFFIXES:
        raise ValueError(f"Data file {path} is not a {', '.join(DATA_SUFFIXES)} file.")
    return _table_rows(path) if path.suffix in (".parquet", ".csv") else _json_items(path)


def _hub_name(path: Path) -> bool:
    return len(path.parts) == 2 and not str(path).startswith((".", "/")) and not path.suffix


def _hub_rows(name: str, split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types: offline, missing, no such split
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--data_path {name} is no local file or directory, and the hub does not give its "
            f"{split!r} split here ({reason})."
        ) from err
    return [(f"{name}[{split}] row {i}", row) for i, row in enumerate(table, start=1)]


def _json_items(path: Path) -> list[tuple[int, Any]]:
    """The records of a JSON array or JSON-lines file, with the line each starts on."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({err.reason}).") from err
    if path.suffix == ".json" or text.lstrip().startswith("["):
        return _array_items(text, path)
    located: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                located.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
    return located


def _table_rows(path: Path) -> list[tuple[str, Any]]:
    """The rows of a parquet or CSV file, read through ``datasets`` (``row N``, from 1)."""
    import datasets

    builder = "parquet" if path.suffix == ".parquet" else "csv"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # pyarrow and datasets raise many types for a damaged file
        raise ValueError(f"{path} is not a readable {builder} file ({type(err).__name__}: {err}).") from err
    return [(f"row {i}", row) for i, row in enumerate(table, start=1)]


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


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_seq_length: int,
    dataset_format: str = "alpaca",
    assistant_only_loss: bool = True,
) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels per checked record (``read_dataset``), truncated to ``max_seq_length``,
    in this process (the job uses the cached ``smt_dist.recipes.tokenized.tokenized_dataset``).

    Returns the examples and how many records were dropped because truncation left them no token
    with a loss (a prompt alone filling ``max_seq_length``).
    """
    check_tokenizer(tokenizer)
    options = (dataset_format, max_seq_length, assistant_only_loss)
    tokenized = [tokenize_one(record, i, tokenizer, *options) for i, record in enumerate(records)]
    examples = [example for example in tokenized if example is not None]
    check_something_left(len(examples), max_seq_length)
    return examples, len(records) - len(examples)


def pack_examples(examples: list[dict[str, list[int]]], *, max_seq_length: int) -> list[dict[str, list[int]]]:
    """Examples laid end to end into rows of at most ``max_seq_length`` tokens, in order.

    Each row carries ``position_ids`` that restart at 0 for every example: given those and no
    attention mask, transformers' causal mask keeps every token inside its own example. The first
    label of each example is ignored, as it is unpacked (it is predicted by nothing of its own), so
    a row's summed loss is the sum of its examples' losses.
    """
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        n = len(example["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > max_seq_length:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def collate(examples: list[dict[str, list[int]]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels``.

    Packed rows (``pack_examples``) get ``position_ids`` instead of an attention mask; their
    padding is one more segment of its own, with no loss."""
    if "position_ids" in examples[0]:
        return _collate_packed(examples, pad_token_id=pad_token_id)
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


def _collate_packed(rows: list[dict[str, list[int]]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        positions[i, :n] = torch.tensor(row["position_ids"])
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


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


def read_chat_template(path: str | Path) -> str:
    """A Jinja chat template from a file, checked to parse."""
    import jinja2
    import jinja2.ext

    class Generation(jinja2.ext.Extension):  # transformers' {% generation %} tag, for parsing only
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Chat template {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        jinja2.Environment(extensions=[Generation, jinja2.ext.loopcontrols]).parse(text)
    except (UnicodeDecodeError, jinja2.TemplateSyntaxError) as err:
        raise ValueError(f"{path} is not a Jinja chat template ({err}).") from err
    return text


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
