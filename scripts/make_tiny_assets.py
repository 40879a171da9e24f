"""Regenerate the embedded default: a small instruction dataset, its tokenizer and a tiny Llama.

    python scripts/make_tiny_assets.py

Writes ``data/tiny_instruct.jsonl`` (Alpaca layout: instruction, input, output) and
``models/tiny-llama/`` (a randomly initialised tiny Llama in safetensors, its config, and a
byte-level BPE tokenizer trained on that data). No hub is reachable at run time, so these ship
with the repo; this script shows how they were made and remakes them bit for bit (fixed seeds).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "candle",
    "forest",
    "silver",
    "market",
    "pocket",
    "ladder",
    "mirror",
]
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "early": "late",
    "light": "dark",
    "full": "empty",
    "fast": "slow",
    "open": "closed",
    "wet": "dry",
    "loud": "quiet",
    "high": "low",
    "old": "new",
    "soft": "hard",
}
HEAVIER = [
    ("a feather", "a brick"),
    ("a leaf", "a rock"),
    ("a coin", "a car"),
    ("a cup", "a table"),
    ("a pencil", "a chair"),
    ("a grape", "a melon"),
    ("a mouse", "a horse"),
    ("a shoe", "a boat"),
]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def make_records(rng: random.Random, count: int) -> list[dict[str, str]]:
    tasks = []
    for _ in range(count):
        kind = rng.randrange(6)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            tasks.append(("Add the two numbers.", f"{a} and {b}", str(a + b)))
        elif kind == 1:
            word = rng.choice(WORDS)
            tasks.append(("Reverse the letters of the word.", word, word[::-1]))
        elif kind == 2:
            n = rng.randrange(1000)
            tasks.append(("Is the number even or odd?", str(n), "even" if n % 2 == 0 else "odd"))
        elif kind == 3:
            word, opposite = rng.choice(sorted(OPPOSITES.items()))
            tasks.append(("Give the opposite of the word.", word, opposite))
        elif kind == 4:
            light, heavy = rng.choice(HEAVIER)
            pair = f"{light} or {heavy}" if rng.random() < 0.5 else f"{heavy} or {light}"
            tasks.append(("Which one is heavier?", pair, heavy))
        else:
            words = rng.sample(WORDS, 3)
            tasks.append(("Sort the words alphabetically.", " ".join(words), " ".join(sorted(words))))
    return [{"instruction": i, "input": x, "output": o} for i, x, o in tasks]


def make_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from smt_dist.training.data import format_prompt

    rng = random.Random(0)
    records = make_records(rng, 1200)
    data_file = ROOT / "data" / "tiny_instruct.jsonl"
    data_file.parent.mkdir(exist_ok=True)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))

    model_dir = ROOT / "models" / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer([format_prompt(r) + r["output"] for r in records], vocab_size=512)
    tokenizer.save_pretrained(model_dir)
    # Name the class that transformers 4 and 5 both know, so either version loads the directory.
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k/v projections are 64 x 128
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(model_dir)
    torch.manual_seed(42)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    print(f"wrote {data_file} ({len(records)} records) and {model_dir} (vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
