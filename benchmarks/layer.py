"""SparseLinear forward+backward time and saved bytes, as ratios to frozen and trainable nn.Linear.

    python benchmarks/layer.py                      # 4096 x 4096, l = 256, 1% and 5%, 2048 tokens
    python benchmarks/layer.py --tokens 512 --repeats 3

Every variant is timed in the same process, round-robin (one of each per round), so machine
noise hits them alike; the medians' ratios are what to read. Writes JSON next to the table.
The "frozen" baseline is an ``nn.Linear`` with a frozen weight that still computes its input
gradient: the floor for any layer that sits under trainable layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from smt_dist import SparseLinear


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, excluding the layer's own parameters and buffers."""
    state = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in state:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


def step_seconds(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).backward(grad_y)
    elapsed = time.perf_counter() - start
    x.grad = None
    for param in layer.parameters():
        param.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/layer.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    l = args.block_size
    grid = (args.out_features // l) * (args.in_features // l)
    frozen = nn.Linear(args.in_features, args.out_features, dtype=dtype).requires_grad_(False)
    trainable = nn.Linear(args.in_features, args.out_features, dtype=dtype)
    variants: dict[str, nn.Module] = {"frozen nn.Linear": frozen, "trainable nn.Linear": trainable}
    for fraction in args.fractions:
        count = max(1, round(fraction * grid))
        flat = torch.randperm(grid)[:count]
        index = torch.stack([flat // (args.in_features // l), flat % (args.in_features // l)], dim=1)
        layer = SparseLinear.from_linear(
            nn.Linear(args.in_features, args.out_features, dtype=dtype), index, block_size=l
        )
        variants[f"SparseLinear {fraction:.0%} ({count} blocks)"] = layer

    x = torch.randn(args.tokens, args.in_features, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.out_features, dtype=dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):
        for name, layer in variants.items():
            seconds = step_seconds(layer, x, grad_y)
            if round_:  # the first round warms caches and allocators
                times[name].append(seconds)

    rows = []
    base_time = statistics.median(times["frozen nn.Linear"])
    full_time = statistics.median(times["trainable nn.Linear"])
    base_bytes = saved_bytes(frozen, x)
    full_bytes = saved_bytes(trainable, x)
    for name, layer in variants.items():
        median = statistics.median(times[name])
        saved = saved_bytes(layer, x)
        rows.append(
            {
                "variant": name,
                "median_s": median,
                "time_vs_frozen": median / base_time,
                "time_vs_trainable": median / full_time,
                "saved_bytes": saved,
                "saved_vs_frozen": saved / base_bytes if base_bytes else None,
                "saved_vs_trainable": saved / full_bytes,
            }
        )
    print(
        f"{args.out_features}x{args.in_features} linear, l={l}, {args.tokens} tokens, {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        f"{'variant':34} {'fwd+bwd s':>9} {'/frozen':>8} {'/trainable':>10} {'saved MiB':>10} {'/trainable':>10}"
    )
    for row in rows:
        print(
            f"{row['variant']:34} {row['median_s']:9.3f} {row['time_vs_frozen']:8.3f} "
            f"{row['time_vs_trainable']:10.3f} {row['saved_bytes'] / 2**20:10.2f} {row['saved_vs_trainable']:10.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
