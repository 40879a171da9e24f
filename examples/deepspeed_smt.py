#!/usr/bin/env python
"""SMT in a plain DeepSpeed training loop whose optimizer comes from the JSON config.

    deepspeed --num_gpus 2 examples/deepspeed_smt.py --deepspeed ds_config.json --output_dir runs/ds

The config is the user's, with its ``"optimizer"`` section (any ZeRO stage, offload or not). The
lines SMT adds or changes are marked ``# SMT``: the warm-up and conversion before the engine, and
``smt_dist.deepspeed.initialize`` in place of ``deepspeed.initialize`` (same arguments, same
results). Saving is DeepSpeed's and transformers' own: the model writes merged weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smt_dist  # noqa: E402  # SMT
import smt_dist.deepspeed as smt_deepspeed  # noqa: E402  # SMT
from smt_dist import SMTConfig  # noqa: E402  # SMT
from smt_dist.recipes.data import collate, read_records, tokenize_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--data", default=str(ROOT / "data" / "tiny_instruct.jsonl"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = json.loads(Path(args.deepspeed).read_text())
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = None
    if zero3:  # transformers then loads the model partitioned
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    examples, _ = tokenize_records(read_records(args.data), tokenizer, max_seq_length=128)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )

    def batches(offset: int):
        for step in range(10**9):
            first = (offset + step * world + rank) * micro
            rows = [examples[i % len(examples)] for i in range(first, first + micro)]
            yield {k: v.to(device) for k, v in collate(rows, pad_token_id=tokenizer.pad_token_id).items()}

    smt_config = SMTConfig(block_size=16, ratio=0.02, warmup_steps=4)  # SMT
    model = smt_deepspeed.prepare(model, batches(0), smt_config, config=ds_config)  # SMT
    engine, _, _, _ = smt_deepspeed.initialize(  # SMT: was deepspeed.initialize
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    stream = batches(100)
    for _ in range(args.steps):
        loss = engine(**next(stream)).loss
        engine.backward(loss)
        engine.step()
        if rank == 0:
            print(f"loss {loss.item():.4f}", flush=True)
    output = Path(args.output_dir)
    if zero3:  # DeepSpeed gathers the 16-bit weights itself; every rank takes part
        state_dict = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            engine.module.save_pretrained(output, state_dict=state_dict)
    elif rank == 0:
        engine.module.save_pretrained(output)
    if rank == 0:
        tokenizer.save_pretrained(output)
    smt_dist.save_smt_adapter(engine.module, output / "smt_adapter", config=smt_config)  # SMT (optional)
    torch.distributed.barrier()
    engine.destroy()
    torch.distributed.destroy_process_group()
    del keep_alive


if __name__ == "__main__":
    main()
