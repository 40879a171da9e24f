"""Where a training step's time goes, SMT against LoRA at the same trainable count: torch.profiler.

    python benchmarks/profile_step.py                     # 119M Llama, SMT-1% and LoRA, 1 thread
    python benchmarks/profile_step.py --size small --ratio 0.05

One process, the same model and batches, forward + backward + AdamW step; the methods alternate
step by step, each step profiled on its own, after two untimed ones. Prints each method's top operators by self CPU time and, per
operator, SMT's time minus LoRA's: what SMT spends more on, and where it saves. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from compare import TARGETS, lora_rank  # noqa: E402
from shapes import SIZES, build_llama, random_batches  # noqa: E402


def build(args, method: str):
    """The model as the method sets it up, and its step (forward, backward, AdamW)."""
    from smt_dist import SMTConfig, choose_blocks, count_parameters
    from smt_dist.core.surgery import apply_smt

    model = build_llama(args.size)
    model.train()
    config = SMTConfig(block_size=args.block_size, ratio=args.ratio, warmup_steps=4, target_modules=TARGETS)
    if method == "smt":
        warmup = random_batches(args.size, 4, batch=args.batch, seq=args.seq, seed=1)
        selection, _ = choose_blocks(model, warmup, config)
        apply_smt(model, selection, config)
    else:
        from peft import LoraConfig, get_peft_model

        from smt_dist.core.selection import budget_in_blocks

        blocks = budget_in_blocks(config, total_params=count_parameters(model))
        rank = lora_rank(args.size, blocks * args.block_size**2)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def profile(args) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Self CPU milliseconds and GFLOPs per step by operator name, per method.

    The methods alternate step by step, each step profiled on its own, so a slow spell of the
    machine hits both alike; FLOPs (of the matrix products, as the profiler counts them) do not
    depend on the machine at all."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = {method: build(args, method) for method in ("smt", "lora")}
    batches = list(random_batches(args.size, 2 + args.steps, batch=args.batch, seq=args.seq, seed=2))
    totals: dict[str, dict[str, float]] = {method: {} for method in steps}
    flops: dict[str, dict[str, float]] = {method: {} for method in steps}
    for i, batch in enumerate(batches):
        for method, step in steps.items():
            if i < 2:  # untimed
                step(batch)
                continue
            with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                step(batch)
            for event in prof.key_averages():
                table = totals[method]
                table[event.key] = table.get(event.key, 0.0) + event.self_cpu_time_total / 1000 / args.steps
                if event.flops:
                    flops[method][event.key] = (
                        flops[method].get(event.key, 0.0) + event.flops / 1e9 / args.steps
                    )

    def ranked(tables):
        return {method: dict(sorted(t.items(), key=lambda kv: -kv[1])) for method, t in tables.items()}

    return ranked(totals), ranked(flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="119m")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=None, help="default: 256, or 64 below 119m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "profile_step.json")
    args = parser.parse_args()
    if args.block_size is None:
        args.block_size = 256 if args.size in ("119m", "deep427m", "1b", "7b") else 64
    torch.set_num_threads(args.threads)
    tables, flops = profile(args)
    smt, lora = tables["smt"], tables["lora"]
    for name in ("smt", "lora"):
        print(f"{name} GFLOPs per step: " + ", ".join(f"{op} {g:.1f}" for op, g in flops[name].items()))
    for name, table in (("SMT", smt), ("LoRA", lora)):
        print(f"\n{name}: {sum(table.values()):.0f} ms self CPU per step; top operators (ms per step)")
        for op, ms in list(table.items())[: args.top]:
            print(f"  {ms:8.1f}  {op}")
    delta = {op: smt.get(op, 0.0) - lora.get(op, 0.0) for op in set(smt) | set(lora)}
    ranked = sorted(delta.items(), key=lambda kv: -abs(kv[1]))[: args.top]
    print(f"\nSMT - LoRA, ms per step (total {sum(delta.values()):+.0f}):")
    for op, ms in ranked:
        print(f"  {ms:+8.1f}  {op}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args) | {"json": str(args.json)}, "smt": smt, "lora": lora, "gflops": flops}
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
