"""The layouts training data comes in, and how each becomes token ids and labels.

- ``alpaca``: ``instruction``, ``input``, ``output``; the Alpaca prompt (``format_prompt``)
  with the loss on the output, as LLM-Adapters and the SMT paper train;
- ``messages``: ``messages``, a list of ``{"role": "system"|"user"|"assistant", "content": ...}``
  (OpenAI's and TRL's conversational layout);
- ``sharegpt``: ``conversations``, a list of ``{"from": "system"|"human"|"gpt", "value": ...}``
  (also ``user``/``assistant``), turned into ``messages``;
- ``prompt_completion``: ``prompt`` and ``completion``, the loss on the completion;
- ``text``: ``text``, the loss on every token (continued pretraining).

Conversations go through the tokenizer's chat template. With ``assistant_only_loss`` (the default)
only the assistant's turns carry loss, found by the template's ``{% generation %}`` markers (as in
transformers' ``return_assistant_tokens_mask`` and TRL's ``assistant_only_loss``); a template
without them is refused in one sentence rather than guessed at. Every response ends in the eos
token. A record of the wrong shape is a ``ValueError`` naming where it is.
"""

from __future__ import annotations

import re
from typing import Any

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
IGNORE_INDEX = -100
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
_KEYS = {  # the field that tells each layout apart, in the order detection tries them
    "messages": "messages",
    "sharegpt": "conversations",
    "prompt_completion": "completion",
    "alpaca": "instruction",
    "text": "text",
}


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


def detect_format(record: Any, where: str) -> str:
    """The layout of one record, from its fields; ``ValueError`` when none fits."""
    if isinstance(record, dict):
        for name, key in _KEYS.items():
            if key in record:
                return name
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"{where}: cannot tell the data format from the fields {found}; records need 'instruction' and "
        "'output' (alpaca), 'messages', 'conversations' (sharegpt), 'prompt' and 'completion', or 'text' "
        "(or pass --dataset_format)."
    )


def checked_record(record: Any, dataset_format: str, where: str) -> dict[str, Any]:
    """The record in its layout's canonical form (sharegpt as ``messages``), every field checked."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    if dataset_format == "alpaca":
        for key in ("instruction", "output"):
            _require_text(record, key, where)
        if not isinstance(record.get("input", "") or "", str):
            raise ValueError(f"{where}: the field 'input' must be a string.")
        return {
            "instruction": record["instruction"],
            "input": record.get("input") or "",
            "output": record["output"],
        }
    if dataset_format == "prompt_completion":
        _require_text(record, "prompt", where)
        _require_text(record, "completion", where)
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if dataset_format == "text":
        _require_text(record, "text", where)
        return {"text": record["text"]}
    if dataset_format == "messages":
        return {
            "messages": _checked_turns(record.get("messages"), "messages", "role", "content", ROLES, where)
        }
    if dataset_format == "sharegpt":
        turns = _checked_turns(
            record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES, where
        )
        return {"messages": turns}
    raise ValueError(f"Unknown data format {dataset_format!r}; choose one of {', '.join(FORMATS)}.")


def _require_text(record: dict, key: str, where: str) -> None:
    if not isinstance(record.get(key), str) or not record[key].strip():
        raise ValueError(f"{where}: the record lacks a non-empty string field '{key}'.")


def _checked_turns(
    turns: Any, field: str, role_key: str, text_key: str, roles: dict[str, str], where: str
) -> list[dict[str, str]]:
    """The turns as ``messages`` (``roles`` maps the layout's role names to system/user/assistant)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: '{field}' must be a non-empty list of turns.")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{where}: turn {i} of '{field}' must be an object with a string '{text_key}'.")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(
                f"{where}: turn {i} of '{field}' has the unknown {role_key} {role!r}; known: {', '.join(roles)}."
            )
        out.append({"role": roles[role], "content": turn[text_key]})
    if not any(t["role"] == "assistant" for t in out):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing in it is learned.")
    return out


def tokenize_record(
    record: dict[str, Any],
    dataset_format: str,
    tokenizer: Any,
    *,
    assistant_only_loss: bool = True,
    where: str = "a record",
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` where no loss) of one checked record, not yet truncated."""
    eos = tokenizer.eos_token_id
    if dataset_format in ("alpaca", "prompt_completion"):  # the loss on what follows the prompt
        alpaca = dataset_format == "alpaca"
        prompt_text = format_prompt(record) if alpaca else record["prompt"]
        prompt = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        response = tokenizer(record["output" if alpaca else "completion"], add_special_tokens=False)[
            "input_ids"
        ]
        return prompt + response + [eos], [IGNORE_INDEX] * len(prompt) + response + [eos]
    if dataset_format == "text":
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + [eos]
        return ids, list(ids)
    return _tokenize_chat(record["messages"], tokenizer, assistant_only_loss=assistant_only_loss, where=where)


def _tokenize_chat(
    messages, tokenizer, *, assistant_only_loss: bool, where: str
) -> tuple[list[int], list[int]]:
    template = tokenizer.chat_template
    if not template:
        raise ValueError(
            "The tokenizer has no chat template, so conversations cannot be laid out; pass "
            "--chat_template FILE (a Jinja template, e.g. data/chat_template.jinja)."
        )
    if assistant_only_loss and not _GENERATION.search(template):
        raise ValueError(
            "The chat template has no {% generation %} markers, so the assistant's tokens cannot be "
            "found; pass --chat_template with them (see data/chat_template.jinja) or --assistant_only_loss false."
        )
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only_loss
        )
    except Exception as err:  # a template is user code: any error it raises is theirs to read
        raise ValueError(f"{where}: the chat template fails on this conversation ({err}).") from err
    ids = list(out["input_ids"])
    if not assistant_only_loss:
        return ids, list(ids)
    mask = out["assistant_masks"]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"{where}: the chat template marks none of the assistant's tokens for the loss.")
    return ids, labels
