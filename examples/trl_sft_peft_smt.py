#!/usr/bin/env python
"""SMT in a TRL ``SFTTrainer`` script through peft: where a LoRA user passes ``LoraConfig``.

    torchrun --nproc_per_node 2 examples/trl_sft_peft_smt.py --deepspeed configs/zero3_smt.json --output_dir runs/trl
    torchrun --nproc_per_node 2 examples/trl_sft_peft_smt.py --deepspeed configs/zero2_smt.json --output_dir runs/trl
    torchrun --nproc_per_node 2 examples/trl_sft_peft_smt.py --load_in_4bit --output_dir runs/qsmt   # QLoRA's base

The lines SMT changes are marked ``# SMT``: ``SMTPeftConfig`` in place of ``LoraConfig``, and
``preprocess_smt`` (the warm-up that picks the blocks) before the trainer is built. Everything
else is TRL's and peft's own: prompt/completion data with the loss on the completion,
``trainer.save_model`` writing a peft adapter (under ZeRO-3 the Trainer gathers only the trainable
blocks), and ``PeftModel.from_pretrained(base, path).merge_and_unload()`` giving the fine-tuned
model. The script also writes the trained model's logits on one example (``probe_logits.
safetensors``), so a test can check that the saved adapter reproduces the model that trained.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import deepspeed
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smt_dist.peft import SMTPeftConfig, preprocess_smt  # noqa: E402  # SMT
from smt_dist.recipes.data import collate, format_prompt, read_records, tokenize_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--data", default=str(ROOT / "data" / "tiny_instruct.jsonl"))
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--load_in_4bit", action="store_true", help="QLoRA's base: NF4 (bitsandbytes)")
    args = parser.parse_args()

    training_args = SFTConfig(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        max_steps=args.max_steps,
        max_length=128,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
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
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    quantization = {}
    if args.load_in_4bit:  # exactly as for QLoRA
        from transformers import BitsAndBytesConfig

        device = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"}
        quantization = dict(
            device_map=device,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, **quantization)
    records = read_records(args.data)
    dataset = Dataset.from_list([{"prompt": format_prompt(r), "completion": r["output"]} for r in records])

    peft_config = SMTPeftConfig(  # SMT: in place of LoraConfig(r=..., target_modules=...)
        block_size=16,
        ratio=0.02,
        warmup_steps=4,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    )
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    warmup, _ = tokenize_records(records[rank::world][:16], tokenizer, max_seq_length=128)  # SMT
    preprocess_smt(  # SMT: the warm-up picks the blocks, on every rank
        model,
        peft_config,
        (collate(warmup[i : i + 4], pad_token_id=tokenizer.pad_token_id) for i in range(0, 16, 4)),
    )

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "final"))

    probe = tokenizer(format_prompt(records[0]) + records[0]["output"], return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():  # on every rank: under ZeRO-3 the forward gathers each layer
        logits = trainer.model(**{k: v.to(trainer.model.device) for k, v in probe.items()}).logits
    if trainer.is_world_process_zero():
        save_file(
            {"input_ids": probe["input_ids"].contiguous(), "logits": logits.float().cpu().contiguous()},
            str(Path(args.output_dir) / "probe_logits.safetensors"),
        )


if __name__ == "__main__":
    main()
