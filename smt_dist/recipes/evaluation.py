"""Accuracy on the LLM-Adapters test sets the SMT paper reports: answers read the way theirs are.

The paper evaluates on LLM-Adapters' commonsense (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande,
ARC-e/c, OBQA) and math (GSM8K, SVAMP, MultiArith, AddSub, SingleEq, AQuA) test files: JSON lists
of records with an ``instruction`` (and optional ``input``) and the ``answer``. The model's
response is the text after ``### Response:``; from it LLM-Adapters' evaluators take

- commonsense: the *first* occurrence of the dataset's answer words (``true``/``false``,
  ``solution1``/``solution2``, ``answer1``-``answer5``, ``ending1``-``ending4``,
  ``option1``/``option2``), compared with the answer as a string;
- math: the *last* number (commas removed), correct within 0.001 of the answer; AQuA: the first of
  the capital letters A-E.

Those rules are restated here, not imported, so a dataset name picks the rule; the generated
tasks the repository ships (``tiny_facts`` in ARC's layout, ``tiny_arith`` in GSM8K's) use ARC's
and GSM8K's. A task of any other name gets its rule from its layout, read off its test file's
answers (``read_test_file``): numbers take the math rule, letters A-E AQuA's, ``true``/``false``
BoolQ's and ``<word><digit>`` options (``answer3``, ``option2``) the commonsense rule over those
words. Generation is greedy and batched (left padding); every rank of a job can take a slice of
the records.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from smt_dist.files.jsonfile import read_json
from smt_dist.recipes.data import format_prompt

_CHOICES = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "arc-challenge": r"answer1|answer2|answer3|answer4|answer5",
    "arc-easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "tiny_facts": r"answer1|answer2|answer3|answer4",  # the shipped task in ARC's layout
}
_NUMBERS = ("gsm8k", "svamp", "multiarith", "addsub", "singleeq", "tiny_arith")
_LETTERS = ("aqua",)
DATASETS = (*_CHOICES, *_NUMBERS, *_LETTERS)
RESPONSE_MARKER = "### Response:"


_BY_LAYOUT: dict[str, tuple[str, str]] = {}
"""Tasks named by nobody above: name to (rule, choice pattern), learned from their answers."""


def rule_of(dataset: str) -> str:
    """``choice``, ``number`` or ``letter``: how answers of ``dataset`` are read."""
    name = dataset.lower()
    if name in _CHOICES:
        return "choice"
    if name in _NUMBERS:
        return "number"
    if name in _LETTERS:
        return "letter"
    if name in _BY_LAYOUT:
        return _BY_LAYOUT[name][0]
    raise ValueError(
        f"Unknown dataset {dataset!r}; known: {', '.join(DATASETS)} (or any task whose test file's "
        "answers are numbers, letters A-E, true/false or options like answer1)."
    )


def rule_from_answers(answers: list[Any]) -> tuple[str, str] | None:
    """The rule (and, for choices, the answer words' pattern) a task's answers show, or ``None``."""
    texts = [str(a).strip() for a in answers]
    try:
        [float(t) for t in texts]
        return "number", ""
    except ValueError:
        pass
    if all(t in ("A", "B", "C", "D", "E") for t in texts):
        return "letter", ""
    if all(t.lower() in ("true", "false") for t in texts):
        return "choice", r"true|false"
    options = [re.fullmatch(r"([a-z]+)([1-9])", t) for t in texts]
    if all(options) and len({m.group(1) for m in options}) == 1:
        return "choice", rf"{options[0].group(1)}[1-9]"  # any of the options, as LLM-Adapters' lists
    return None


def extract_answer(dataset: str, response: str) -> str | float:
    """The prediction in a response, by the dataset's rule (``""`` or ``inf`` when there is none)."""
    rule, text = rule_of(dataset), response.strip()
    if rule == "choice":
        pattern = _CHOICES.get(dataset.lower()) or _BY_LAYOUT[dataset.lower()][1]
        found = re.findall(pattern, text)
        return found[0] if found else ""
    if rule == "letter":
        found = re.findall(r"A|B|C|D|E", text)
        return found[0] if found else ""
    found = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(found[-1]) if found else float("inf")


def is_correct(dataset: str, prediction: str | float, answer: Any) -> bool:
    """Whether a prediction matches the record's answer, by the dataset's rule."""
    if rule_of(dataset) == "number":
        try:
            return abs(float(answer) - float(prediction)) <= 1e-3
        except (TypeError, ValueError):
            return False
    return prediction == answer


def read_test_file(path: str | Path, dataset: str) -> list[dict[str, Any]]:
    """A test file's records, checked: each needs a non-empty ``instruction`` and an ``answer``.

    A dataset of a name this module does not know gets its rule from the answers' layout here.
    """
    path = Path(path)
    records = read_json(path, what="Test file")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records.")
    if dataset.lower() not in DATASETS and all(isinstance(r, dict) and "answer" in r for r in records):
        learned = rule_from_answers([r["answer"] for r in records])
        if learned is not None:
            _BY_LAYOUT[dataset.lower()] = learned
    number = rule_of(dataset) == "number"
    for i, record in enumerate(records):
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("instruction"), str)
            or not record["instruction"]
        ):
            raise ValueError(f"{path}: record {i} lacks a non-empty string 'instruction'.")
        if "answer" not in record:
            raise ValueError(f"{path}: record {i} lacks its 'answer'.")
        if number:
            try:
                float(record["answer"])
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{path}: record {i} has a non-numeric answer {record['answer']!r}."
                ) from err
        if not isinstance(record.get("input", ""), str):
            raise ValueError(f"{path}: record {i} has an 'input' that is not a string.")
    return records


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    device: torch.device | str = "cpu",
) -> Iterator[str]:
    """Greedy responses to the records' Alpaca prompts, in order, a batch at a time."""
    model.eval()
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    for first in range(0, len(records), batch_size):
        prompts = [
            format_prompt({"instruction": r["instruction"], "input": r.get("input", "")})
            for r in records[first : first + batch_size]
        ]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        yield from (text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
