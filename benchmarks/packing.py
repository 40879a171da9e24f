"""Padding and throughput with and without ``--packing``, on the embedded data and model.

    python benchmarks/packing.py                      # both data files, ~3 minutes on 2 cores
    python benchmarks/packing.py --steps 2 --threads 1  # seconds

The job's own data path (``read_dataset``, ``tokenize_records``, ``pack_examples``, ``collate``)
and its SMT model (the shipped tiny Llama, 2% of parameters in 16 x 16 blocks): micro-batches of
``--batch`` rows, padded (one example a row) or packed (examples end to end up to
``--max_seq_length``). The two take turns step by step, so a slow spell on this shared machine hits
both; printed and written to JSON: the share of padding tokens, real tokens per second, and the
ratio of the two throughputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from transformers import AutoModelForCausalLM

    from smt_dist import SMTConfig, apply_smt, choose_blocks
    from smt_dist.files.atomic import write_json
    from smt_dist.recipes.data import collate, load_tokenizer, pack_examples, read_dataset, tokenize_records

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--data", default="data/tiny_instruct.jsonl:256,data/tiny_chat.jsonl:256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and data file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "packing.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(Path(args.model))
    results = {}
    for entry in args.data.split(","):
        path, length = entry.rsplit(":", 1)
        records, fmt = read_dataset(ROOT / path, "auto")
        examples, _ = tokenize_records(records, tokenizer, max_seq_length=int(length), dataset_format=fmt)
        modes = {"padded": examples, "packed": pack_examples(examples, max_seq_length=int(length))}
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.config.use_cache = False
        config = SMTConfig(
            block_size=16, ratio=0.02, warmup_steps=2, target_modules=("q_proj", "k_proj", "v_proj")
        )
        warmup = [
            collate(examples[i : i + args.batch], pad_token_id=tokenizer.pad_token_id)
            for i in (0, args.batch)
        ]
        apply_smt(model, choose_blocks(model, warmup, config)[0], config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        times: dict[str, list[float]] = {m: [] for m in modes}
        real: dict[str, list[int]] = {m: [] for m in modes}
        padded_share: dict[str, list[float]] = {m: [] for m in modes}
        for step in range(args.steps + 1):  # the first step of each mode is a warm-up, not timed
            for mode in sorted(modes, reverse=step % 2 == 1):
                rows = [modes[mode][(step * args.batch + i) % len(modes[mode])] for i in range(args.batch)]
                batch = collate(rows, pad_token_id=tokenizer.pad_token_id)
                began = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:
                    tokens = sum(len(r["input_ids"]) for r in rows)
                    times[mode].append(time.perf_counter() - began)
                    real[mode].append(tokens)
                    padded_share[mode].append(1 - tokens / batch["input_ids"].numel())
        report = {
            mode: {
                "rows": len(modes[mode]),
                "padding": round(statistics.mean(padded_share[mode]), 3),
                "tokens_per_second": round(sum(real[mode]) / sum(times[mode]), 1),
            }
            for mode in modes
        }
        report["packed_over_padded_tokens_per_second"] = round(
            report["packed"]["tokens_per_second"] / report["padded"]["tokens_per_second"], 2
        )
        results[f"{path} (max_seq_length {length})"] = report
        print(path, report, flush=True)
    write_json(Path(args.json), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
