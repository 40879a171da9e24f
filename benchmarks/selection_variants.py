#!/usr/bin/env python
"""Why do the warm-up's blocks train worse than random ones? One selection variant per run.

    python benchmarks/selection_variants.py residual --lrs 1e-2,3e-2     # 80-100 s a rate on 1 quiet thread
    python benchmarks/selection_variants.py --help                       # the variants

Each variant changes only how the blocks are chosen; the budget (LoRA rank ``--rank``'s
trainable count, 16 x 16 blocks on ``quality.TARGETS``), the training, the data and the scoring are
``benchmarks/quality.py``'s own (its ``Study``, seed 0), so a run is comparable with that study's
``smt``, ``random`` and ``lora`` runs (``--seeds``: the seed fixes the example order, the warm-up's
batches and the random blocks, as there). Each finished run goes into ``--output`` (default
``benchmarks/results/selection_<variant>.json``) and a rerun resumes. Besides the accuracy it
prints where the blocks went: modules, distinct (module, row-block) pairs, blocks per layer and
per module type (docs/quality.md, "Which selections train").

The variants:

- ``plain``: the paper's selection (8 warm-up micro-batches at the base, global top-k of
  ``mean_abs``); the study's ``smt``.
- ``long``: the same with 64 warm-up micro-batches (is the score noise?).
- ``authors``: the authors' warm-up, weights moving: 32 steps of full fine-tuning (AdamW, lr
  1e-4, clipped at 1.0) summing each target's weight gradient, then the mean ``|sum|`` per block;
  the chosen blocks train from the base like every other method.
- ``rownorm``: each block's score divided by the mean score of its row-block in its module.
- ``colnorm``: divided by the mean of its column-block instead.
- ``residual``: divided by the rank-one fit of its row's and column's strengths,
  ``s_rc * mean(s) / (mean_r(s) * mean_c(s))``: what is left of a block's score once the strength
  of its output features and of its input features is taken out.
- ``cap1``: at most one block per (module, row-block), ``SMTConfig(max_blocks_per_row=1)``;
  ``authors_cap1``: the authors' warm-up's scores under that cap.
- ``colcap1``: at most one block per (module, column-block) instead: the same cap on the
  transposed scores (do blocks need to reach many input features, or many output ones?).
- ``block32``: 32 x 32 blocks at the same parameter count.
- ``random``: the study's random control; ``lora``: the study's LoRA at rank ``--rank``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality

from smt_dist import BlockSelection, SMTConfig, apply_smt, collect_block_scores, find_targets, select_blocks
from smt_dist.core.blocks import block_view

VARIANTS = (
    "plain",
    "long",
    "authors",
    "rownorm",
    "colnorm",
    "residual",
    "cap1",
    "authors_cap1",
    "colcap1",
    "block32",
    "random",
    "lora",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--lrs", default="1e-2,3e-2")
    parser.add_argument("--seeds", default="0", help="Each rate runs with each seed.")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank whose trainable count is the budget.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    parser.add_argument("--limit", type=int, default=0, help="Score only the first N records per split.")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--model", default=str(quality.REPO / "models" / "world-llama"))
    args = parser.parse_args()
    output = args.output or str(quality.REPO / "benchmarks" / "results" / f"selection_{args.variant}.json")
    study_args = quality.parse_args(
        ["--output", output, "--threads", str(args.threads), "--ranks", str(args.rank), "--seeds", "0",
         "--limit", str(args.limit), "--steps", str(args.steps), "--model", args.model]
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    study = VariantStudy(study_args, args.variant)
    study.base()
    method = "lora" if args.variant == "lora" else f"smt_{args.variant}"
    for lr in (float(x) for x in args.lrs.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            study.one(method, args.rank, lr, seed)


class VariantStudy(quality.Study):
    """``quality.Study`` with the blocks chosen by one variant."""

    def __init__(self, args: argparse.Namespace, variant: str) -> None:
        super().__init__(args)
        self.variant = variant

    def prepare(self, method, size, batches, seed):
        if self.variant == "lora":
            return super().prepare(method, size, batches, seed)
        model = self.load_model()
        block = 32 if self.variant == "block32" else quality.BLOCK
        budget = quality.lora_parameters(model, size) // block**2
        config = SMTConfig(
            block_size=block,
            target_modules=",".join(quality.TARGETS),
            num_blocks=budget,
            warmup_steps=64 if self.variant == "long" else self.args.warmup_steps,
            max_blocks_per_row=1 if self.variant in ("cap1", "authors_cap1", "colcap1") else None,
        )
        if self.variant == "random":
            selection = quality.random_blocks(model, config, budget, seed=seed)
        else:
            if self.variant in ("authors", "authors_cap1"):
                scores = moving_warmup_scores(model, batches[:32], config)
                model = self.load_model()  # the chosen blocks train from the base, as every method's
            else:
                scores = collect_block_scores(model, itertools.cycle(batches), config)
            if self.variant == "colcap1":  # the row cap on [in/l, out/l] scores, indices turned back
                picked = select_blocks({n: score.t() for n, score in scores.items()}, config)
                selection = BlockSelection(
                    config.block_size, {n: i.flip(1) for n, i in picked.blocks.items()}
                )
            else:
                selection = select_blocks(normalise(scores, self.variant), config)
        apply_smt(model, selection, config)
        summary = selection.summary(config)
        rows = sum(len({int(r) for r in index[:, 0]}) for index in selection.blocks.values())
        columns = sum(len({int(c) for c in index[:, 1]}) for index in selection.blocks.values())
        summary["row_blocks"], summary["column_blocks"] = rows, columns
        print(f"{self.variant}: {len(selection.blocks)} modules, {rows} (module, row-block) and "
              f"{columns} (module, column-block) pairs, "
              f"by layer {summary.get('by_layer')}, by type {summary.get('by_type')}", flush=True)  # fmt: skip
        return model, [p for p in model.parameters() if p.requires_grad], summary


def moving_warmup_scores(model, batches: list[dict], config: SMTConfig) -> dict[str, torch.Tensor]:
    """Full fine-tuning over ``batches`` summing each target's weight gradient; mean ``|sum|`` per block."""
    targets = find_targets(model, config)
    sums = {name: torch.zeros_like(module.weight) for name, module in targets.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    for batch in batches:
        model(**batch).loss.backward()
        for name, module in targets.items():
            sums[name] += module.weight.grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        # block_view is (out/l, l, in/l, l): a block's elements are dims 1 and 3
        name: block_view(total.abs(), config.block_size).mean(dim=(1, 3))
        for name, total in sums.items()
    }


def normalise(scores: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Each module's ``[row-blocks, column-blocks]`` scores as the variant ranks them."""
    if variant == "rownorm":
        return {n: s / s.mean(dim=1, keepdim=True) for n, s in scores.items()}
    if variant == "colnorm":
        return {n: s / s.mean(dim=0, keepdim=True) for n, s in scores.items()}
    if variant == "residual":
        return {
            n: s * s.mean() / (s.mean(dim=1, keepdim=True) * s.mean(dim=0, keepdim=True))
            for n, s in scores.items()
        }
    return scores


if __name__ == "__main__":
    sys.exit(main())
