"""Regenerate the embedded data: the instruction set, the two evaluation tasks, and the tokenizer.

    python scripts/make_tiny_assets.py          # seconds; then scripts/pretrain_tiny.py makes the model

Writes, from the generated world of ``scripts/tiny_world.py`` and fixed seeds (bit for bit the same
on every machine):

- ``data/tiny_instruct.jsonl``: the fine-tuning set (Alpaca layout): the train splits of both tasks;
- ``data/tiny_chat.jsonl``: 400 of its questions as conversations (``messages``), for the chat formats;
- ``data/tiny_eval/<task>/{test,val}.json``: held-out splits in LLM-Adapters' layout
  (``instruction``, ``input``, ``output``, ``answer``), never in the fine-tuning set;
- ``models/tiny-llama/`` and ``models/world-llama/`` tokenizer files: byte-level BPEs trained on
  each model's pretraining text and the tasks, so each vocabulary covers both.

No hub is reachable at run time, so these ship with the repo; this script shows how they were made.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from tiny_world import (  # noqa: E402
    arith_questions,
    facts_questions,
    make_world,
    pretraining_text,
    split,
    world_text,
)

MODEL_DIR = ROOT / "models" / "tiny-llama"
WORLD_MODEL_DIR = ROOT / "models" / "world-llama"
VOCAB_SIZE = 2048
TOKENIZER_SENTENCES = 60_000


def make_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with bos/eos/pad/unk, trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


CHAT_TEMPLATE = ROOT / "data" / "chat_template.jinja"


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    # "User: ... / Assistant: ...", the chat layout of the world's pretraining text, with the
    # {% generation %} markers that let the job train on the assistant's turns only.
    tokenizer.chat_template = CHAT_TEMPLATE.read_text()
    tokenizer.save_pretrained(model_dir)
    # Name the class that transformers 4 and 5 both know, so either version loads the directory.
    config_file = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def task_splits(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Both tasks' test / val / train splits; training questions get three option orders each."""
    world = make_world(seed)
    facts = split(facts_questions(world, random.Random(seed + 1)), random.Random(seed + 2), test=100, val=50)
    arith = split(arith_questions(random.Random(seed + 3)), random.Random(seed + 4), test=100, val=50)
    # More orders of the same training questions, so the answer's position is not learned by heart,
    # and the training sums and differences once more with other names and things.
    extra = [q for i in range(2) for q in facts_questions(world, random.Random(seed + 10 + i))]
    train_questions = {r["instruction"].split("\n")[0] for r in facts["train"]}
    facts["train"] += [q for q in extra if q["instruction"].split("\n")[0] in train_questions]
    pairs = {tuple(r["output"].split(" = ")[0].split()[-3::2]) for r in arith["train"]}
    arith["train"] += [
        q
        for q in arith_questions(random.Random(seed + 20))
        if tuple(q["output"].split(" = ")[0].split()[-3::2]) in pairs
    ]
    return {"tiny_facts": facts, "tiny_arith": arith}


def chat_records(records: list[dict], rng: random.Random) -> list[dict]:
    """The same questions as conversations (``messages``): one or two user/assistant turns, some
    after a system line; the data the job's chat formats are tested on."""
    out, i = [], 0
    while i < len(records):
        turns = records[i : i + rng.choice((1, 2))]
        i += len(turns)
        messages = [{"role": "system", "content": "Answer the question."}] if rng.random() < 0.3 else []
        for record in turns:
            messages += [
                {"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["output"]},
            ]
        out.append({"messages": messages})
    return out


def main() -> None:
    from smt_dist.recipes.data import format_prompt

    tasks = task_splits()
    train = [r for task in tasks.values() for r in task["train"]]
    random.Random(5).shuffle(train)
    data_file = ROOT / "data" / "tiny_instruct.jsonl"
    data_file.parent.mkdir(exist_ok=True)
    data_file.write_text(
        "".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in train)
    )
    chat_file = ROOT / "data" / "tiny_chat.jsonl"
    chat_file.write_text("".join(json.dumps(c) + "\n" for c in chat_records(train[:400], random.Random(6))))
    for name, splits in tasks.items():
        folder = ROOT / "data" / "tiny_eval" / name
        folder.mkdir(parents=True, exist_ok=True)
        for part in ("test", "val"):
            (folder / f"{part}.json").write_text(json.dumps(splits[part], indent=1) + "\n")

    world = make_world(0)
    task_texts = [
        format_prompt(r) + r["output"] for task in tasks.values() for part in task.values() for r in part
    ]
    corpora = {
        MODEL_DIR: pretraining_text(world, random.Random(7), sentences=TOKENIZER_SENTENCES),
        WORLD_MODEL_DIR: world_text(world, random.Random(7), documents=TOKENIZER_SENTENCES // 6),
    }
    for model_dir, texts in corpora.items():
        tokenizer = make_tokenizer(texts + task_texts, VOCAB_SIZE)
        save_tokenizer(tokenizer, model_dir)
    sizes = {name: {part: len(rows) for part, rows in splits.items()} for name, splits in tasks.items()}
    print(
        f"wrote {data_file} ({len(train)} records), data/tiny_eval {sizes}, tokenizer (vocab {len(tokenizer)})"
    )


if __name__ == "__main__":
    main()
