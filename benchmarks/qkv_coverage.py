"""How much of each layer's q/k/v input a real SMT selection reads, and what SMT keeps of it.

    python benchmarks/qkv_coverage.py --size 1b        # a real warm-up on the 1B shape, ~5 minutes on 2 cores
    python benchmarks/qkv_coverage.py --size tiny      # seconds

Runs the warm-up (``mean_abs``, random batches) on a Llama built from a config, selects at 0.5, 1,
2 and 5% of the parameters on q, k and v, converts the model and reports, per budget, the share of
a layer's q/k/v input that separate column copies would keep (``copies``, summed over the
layer's selected modules) and what the sharing rule keeps (``kept``: at most the input once), both
averaged over all layers, and the share of layers from the lowest one with a block to the top
(``backward_depth``: the layers below need no backward and keep no activation).
``benchmarks/analytic.py`` uses the 1B figure for its 7B and 13B
activation model. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from shapes import build_llama, random_batches

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj")
RATIOS = (0.005, 0.01, 0.02, 0.05)


def column_coverage(model: torch.nn.Module) -> dict[str, float]:
    """Per layer: q/k/v input share in separate copies, kept with sharing; means over all layers."""
    from smt_dist.core.surgery import smt_modules

    layers: dict[str, list] = {}
    for name, module in smt_modules(model).items():
        layers.setdefault(name.rsplit(".", 2)[0], []).append(module)
    count = model.config.num_hidden_layers
    copies = [sum(m.column_coverage for m in members) for members in layers.values()]
    kept = [
        1.0 if any(m.save_input for m in members) else c
        for members, c in zip(layers.values(), copies, strict=True)
    ]
    lowest = min(int(name.rsplit(".", 1)[-1]) for name in layers)
    return {
        "copies": sum(copies) / count,
        "kept": sum(kept) / count,
        "layers_with_blocks": len(layers) / count,
        # Layers below the lowest selected block need no backward and keep no activation.
        "backward_depth": (count - lowest) / count,
    }


def main() -> None:
    from smt_dist import (
        SMTConfig,
        apply_smt,
        collect_block_scores,
        count_parameters,
        merge_smt,
        select_blocks,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1b")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = build_llama(args.size)
    total = count_parameters(model)
    config = SMTConfig(
        block_size=args.block_size, ratio=0.01, warmup_steps=args.warmup, target_modules=TARGETS
    )
    scores = collect_block_scores(
        model, random_batches(args.size, args.warmup, batch=args.batch, seq=args.seq), config
    )
    results = {}
    for ratio in RATIOS:
        budget = SMTConfig(**{**config.to_dict(), "ratio": ratio})
        apply_smt(model, select_blocks(scores, budget, total_params=total), budget)
        results[f"{ratio * 100:g}%"] = column_coverage(model)
        merge_smt(model)  # blocks are zero: the base comes back unchanged for the next budget
        print(f"{ratio * 100:g}%: {results[f'{ratio * 100:g}%']}", flush=True)
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"coverage_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"size": args.size, "block_size": args.block_size, "coverage": results}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
