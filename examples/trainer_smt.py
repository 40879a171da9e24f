#!/usr/bin/env python
"""SMT in a Hugging Face Trainer script: the three added lines are marked ``# SMT``.

    torchrun --nproc_per_node 2 examples/trainer_smt.py --deepspeed configs/zero3_smt.json --output_dir runs/trainer
    torchrun --nproc_per_node 2 examples/trainer_smt.py --deepspeed configs/zero2_smt.json --output_dir runs/trainer

Everything else is an ordinary Trainer script: the TrainingArguments come first (with a ZeRO-3
config they make transformers load the model partitioned), then the model, the data and the
Trainer; ``trainer.save_model`` writes a checkpoint that ``from_pretrained`` loads as the
fine-tuned model, and the adapter lands in ``<output_dir>/smt_adapter``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smt_dist.trainer  # noqa: E402  # SMT
from smt_dist import SMTConfig  # noqa: E402  # SMT
from smt_dist.recipes.data import collate, read_records, tokenize_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--data", default=str(ROOT / "data" / "tiny_instruct.jsonl"))
    parser.add_argument("--max_steps", type=int, default=6)
    args = parser.parse_args()

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=2e-3,
        max_steps=args.max_steps,
        save_steps=3,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if training_args.use_cpu and args.deepspeed:
        # On GPUs accelerate starts DeepSpeed's communicator; on CPU (our tests) we start it, so
        # that ZeRO-3's partitioned load below sees the whole world.
        deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    examples, _ = tokenize_records(read_records(args.data), tokenizer, max_seq_length=128)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=lambda rows: collate(rows, pad_token_id=tokenizer.pad_token_id),
    )
    smt_dist.trainer.prepare_trainer(trainer, SMTConfig(block_size=16, ratio=0.02, warmup_steps=4))  # SMT
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "final"))


if __name__ == "__main__":
    main()
