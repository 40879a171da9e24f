"""BlockShardedAdamW.step() against torch.optim.AdamW (fused, foreach) on the same block parameters.

    python benchmarks/optimizer.py                    # 256, 2048, 8192 blocks of 64x64 and 256x256
    python benchmarks/optimizer.py --blocks 256 --sizes 64 --repeats 3   # a smoke run
    python benchmarks/optimizer.py --device cuda      # on a GPU

One process, one set of block parameters (spread over ``--params`` tensors, as SMT spreads blocks
over target modules) with fixed gradients; each optimizer keeps its own state and the steps are
interleaved, so every ratio is measured side by side. Also counts the aten operations one step
dispatches: BlockShardedAdamW's count must not grow with the number of blocks. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smt_dist.optim import BlockShardedAdamW  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def make_params(blocks: int, size: int, params: int, device: str) -> list[torch.nn.Parameter]:
    """``blocks`` blocks of ``size x size`` spread as evenly as possible over ``params`` tensors."""
    generator = torch.Generator().manual_seed(0)
    counts = [blocks // params + (i < blocks % params) for i in range(params)]
    out = []
    for count in counts:
        p = torch.nn.Parameter(torch.randn(count, size, size, generator=generator).to(device) * 0.02)
        p.grad = torch.randn(count, size, size, generator=generator).to(device) * 1e-3
        out.append(p)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(blocks: int, size: int, args: argparse.Namespace) -> dict:
    params = make_params(blocks, size, args.params, args.device)
    optimizers = {
        "BlockShardedAdamW": BlockShardedAdamW(params, lr=1e-4, weight_decay=0.01),
        "torch fused": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True),
    }
    if (
        not args.no_foreach
    ):  # its state is another copy of the blocks twice over: skip it at the largest sizes
        optimizers["torch foreach"] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)
    ops, times = {}, {name: [] for name in optimizers}
    for name, optimizer in optimizers.items():  # first step: state creation, not timed
        optimizer.step()
        with OpCounter() as counter:
            optimizer.step()
        ops[name] = counter.count
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            sync(args.device)
            start = time.perf_counter()
            optimizer.step()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "blocks": blocks,
        "block_size": size,
        "params": args.params,
        "median_s": medians,
        "vs_fused": {name: medians[name] / medians["torch fused"] for name in medians},
        "ops_per_step": ops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="256,2048,8192")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--params", type=int, default=64, help="Tensors the blocks are spread over.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-foreach", action="store_true", help="leave torch's foreach AdamW out (memory)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "optimizer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(
        "| blocks | l | BlockShardedAdamW s | torch fused s | torch foreach s | BSA / fused | foreach / fused "
        "| ops per step (BSA / fused / foreach) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        for blocks in (int(b) for b in args.blocks.split(",")):
            row = measure(blocks, size, args)
            rows.append(row)
            m, r, o = row["median_s"], row["vs_fused"], row["ops_per_step"]
            foreach = "torch foreach" in m
            print(
                f"| {blocks} | {size} | {m['BlockShardedAdamW']:.4f} | {m['torch fused']:.4f} | "
                f"{m['torch foreach'] if foreach else float('nan'):.4f} | {r['BlockShardedAdamW']:.2f} | "
                f"{r['torch foreach'] if foreach else float('nan'):.2f} | "
                f"{o['BlockShardedAdamW']} / {o['torch fused']} / {o.get('torch foreach', '-')} |",
                flush=True,
            )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": args.device, "threads": args.threads, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
