#!/usr/bin/env python
"""SMT in an accelerate training loop with its DeepSpeed plugin (ZeRO-2 or ZeRO-3).

    accelerate launch --config_file configs/accelerate_deepspeed_zero3.yaml examples/accelerate_smt.py --output_dir runs/acc

An ordinary accelerate loop; the lines SMT adds are marked ``# SMT``. Under ZeRO-3 the model is
partitioned as it loads (the plugin's ``zero3_init_flag``) and stays so through the warm-up.
Saving is accelerate's own recipe (``get_state_dict`` + ``save_pretrained``), which writes merged
weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smt_dist  # noqa: E402  # SMT
import smt_dist.deepspeed as smt_deepspeed  # noqa: E402  # SMT
from smt_dist import SMTConfig  # noqa: E402  # SMT
from smt_dist.recipes.data import collate, read_records, tokenize_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--data", default=str(ROOT / "data" / "tiny_instruct.jsonl"))
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    # On GPUs accelerate picks NCCL itself; on CPU (our tests) it needs to be told gloo.
    backend = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(kwargs_handlers=backend)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    examples, _ = tokenize_records(read_records(args.data), tokenizer, max_seq_length=128)
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=4,
        shuffle=False,
        collate_fn=lambda rows: collate(rows, pad_token_id=tokenizer.pad_token_id),
    )
    warmup = (
        {
            k: v.to(accelerator.device)
            for k, v in collate(examples[i : i + 4], pad_token_id=tokenizer.pad_token_id).items()
        }
        for i in range(accelerator.process_index * 16, 10**9, 4)
    )
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config  # SMT
    smt_config = SMTConfig(block_size=16, ratio=0.02, warmup_steps=4)  # SMT
    model = smt_deepspeed.prepare(model, warmup, smt_config, config=ds_config)  # SMT
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"loss {loss.item():.4f}")
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        args.output_dir,
        state_dict=state_dict,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
    smt_dist.save_smt_adapter(  # SMT (optional): the adapter alone
        accelerator.unwrap_model(model), Path(args.output_dir) / "smt_adapter", config=smt_config
    )


if __name__ == "__main__":
    main()
