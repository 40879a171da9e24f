#!/usr/bin/env python
"""SMT in a TRL ``SFTTrainer`` script on chat data, packed, with the loss on the assistant's turns.

    torchrun --nproc_per_node 2 examples/trl_sft_smt.py --deepspeed configs/zero3_smt.json --output_dir runs/trl_chat
    torchrun --nproc_per_node 2 examples/trl_sft_smt.py --deepspeed configs/zero2_smt.json --output_dir runs/trl_chat

The lines SMT adds are marked ``# SMT``, the same as in ``trainer_smt.py``: ``prepare_trainer``
after the trainer is built warms up on the trainer's own (packed) batches, picks the blocks and
swaps in ``SparseLinear``. Everything else is TRL's: ``messages`` conversations through the
tokenizer's chat template, ``packing=True`` (rows of several conversations, ``position_ids``
restarting per conversation), ``assistant_only_loss=True`` (the template marks the assistant's
turns with ``{% generation %}``), and ``trainer.save_model`` writing a checkpoint that
``from_pretrained`` loads as the fine-tuned model. The adapter lands in
``<output_dir>/smt_adapter``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smt_dist.trainer  # noqa: E402  # SMT
from smt_dist import SMTConfig  # noqa: E402  # SMT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--data", default=str(ROOT / "data" / "tiny_chat.jsonl"))
    parser.add_argument("--max_steps", type=int, default=6)
    args = parser.parse_args()

    training_args = SFTConfig(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        per_device_train_batch_size=2,
        learning_rate=2e-3,
        max_steps=args.max_steps,
        max_length=128,
        packing=True,
        assistant_only_loss=True,
        logging_steps=1,
        save_steps=3,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),  # TRL's default on GPUs; fp32 on CPU, where the test checks exactly
    )
    if training_args.use_cpu and args.deepspeed:
        # On GPUs accelerate starts DeepSpeed's communicator; on CPU (our tests) we start it, so
        # that ZeRO-3's partitioned load below sees the whole world.
        deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(args.model)  # its chat_template.jinja comes along
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    smt_dist.trainer.prepare_trainer(trainer, SMTConfig(block_size=16, ratio=0.02, warmup_steps=4))  # SMT
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "final"))


if __name__ == "__main__":
    main()
