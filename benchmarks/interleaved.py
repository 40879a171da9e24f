"""Step time of SMT, LoRA and full fine-tuning interleaved in one process: the least noisy ratio.

    python benchmarks/interleaved.py --size 119m             # SMT-1%, SMT-5%, LoRA, full; ~4 minutes
    python benchmarks/interleaved.py --size tiny --steps 4   # seconds

``compare.py`` runs every method in its own process so each peak memory is its own, but on a
shared machine a slow spell can land on one method's process and not another's. Here every method
is built from the same model in one process and the methods take turns, step by step (the order
alternates), so a slow spell hits them alike; the ratios of the median step times are printed and
written to JSON. SMT's blocks come from one real warm-up, LoRA on q, k, v at SMT-1%'s trainable
count, as in ``compare.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from shapes import build_llama, random_batches

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj")


def main() -> None:
    from compare import lora_rank
    from peft import LoraConfig, get_peft_model

    from smt_dist import SMTConfig, apply_smt, collect_block_scores, count_parameters, select_blocks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="119m")
    parser.add_argument("--methods", default="smt-1,smt-5,lora,full")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "interleaved.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    block = 256 if args.size in ("119m", "1b", "7b") else 64
    base = build_llama(args.size)
    total = count_parameters(base)
    config = SMTConfig(block_size=block, ratio=0.01, warmup_steps=4, target_modules=TARGETS)
    scores = collect_block_scores(base, random_batches(args.size, 4, batch=args.batch, seq=args.seq), config)
    models = {}
    for method in args.methods.split(","):
        model = copy.deepcopy(base)
        if method.startswith("smt"):
            budget = SMTConfig(**{**config.to_dict(), "ratio": float(method.split("-")[1]) / 100})
            apply_smt(model, select_blocks(scores, budget, total_params=total), budget)
        elif method == "lora":
            smt_trainable = int(0.01 * total) // block**2 * block**2
            rank = lora_rank(args.size, smt_trainable)
            model = get_peft_model(
                model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS))
            )
        elif method != "full":
            raise SystemExit(f"unknown method {method!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        models[method] = (model, torch.optim.AdamW(params, lr=1e-5))
    del base
    batches = list(random_batches(args.size, args.steps + 2, batch=args.batch, seq=args.seq, seed=7))
    times: dict[str, list[float]] = {method: [] for method in models}
    for i, batch in enumerate(batches):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for method in order:
            model, optimizer = models[method]
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:  # the first two steps allocate; not timed
                times[method].append(time.perf_counter() - start)
    medians = {method: statistics.median(t) for method, t in times.items()}
    reference = "lora" if "lora" in medians else next(iter(medians))
    print(
        f"{args.size}, batch {args.batch} x {args.seq}, {args.threads} threads, {args.steps} interleaved steps"
    )
    for method, median in medians.items():
        print(f"  {method:8} {median:.3f} s/step  / {reference}: {median / medians[reference]:.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "args": vars(args),
        "median_s": medians,
        f"vs_{reference}": {m: v / medians[reference] for m, v in medians.items()},
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
