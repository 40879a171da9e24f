"""Peak memory of SMT's warm-up phase as a ratio to SMT training (and to full fine-tuning).

    python benchmarks/warmup_memory.py                  # the 119M Llama shape of DESIGN.md
    python benchmarks/warmup_memory.py --size tiny      # a few seconds, for a smoke run

Each phase runs in its own process on the same model, batch and thread count, so each peak
(``ru_maxrss``) is that phase's alone: warm-up scoring (``collect_block_scores``), SMT training
(AdamW over the selected blocks, selected by that same warm-up), and full fine-tuning (AdamW over
everything, which is what the authors' released code runs during its warm-up). Ratios are read
side by side in one run; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from shapes import SIZES, build_llama, random_batches


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_phase(args: argparse.Namespace) -> dict:
    """One phase in this process; prints its JSON result."""
    from smt_dist import SMTConfig, apply_smt, collect_block_scores, count_parameters, select_blocks

    model = build_llama(args.size)
    loaded = peak_mib()
    config = SMTConfig(
        block_size=args.block_size,
        ratio=args.ratio,
        warmup_steps=args.steps,
        target_modules=tuple(args.targets.split(",")),
    )
    data = random_batches(args.size, args.steps, batch=args.batch, seq=args.seq)
    if args.phase == "warmup":
        scores = collect_block_scores(model, data, config)
        selection = select_blocks(scores, config, total_params=count_parameters(model))
        torch.save(selection.blocks, args.selection)
    else:
        if args.phase == "smt":
            from smt_dist import BlockSelection

            blocks = torch.load(args.selection)
            apply_smt(model, BlockSelection(block_size=args.block_size, blocks=blocks), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for batch in data:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    trainable = 0 if args.phase == "warmup" else sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"phase": args.phase, "peak_mib": peak_mib(), "model_loaded_mib": loaded, "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="119m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="warm-up micro-batches / training steps")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/warmup_memory.json"))
    parser.add_argument("--phase", choices=["warmup", "smt", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--selection", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return

    if args.size == "tiny" and args.block_size == 256:
        args.block_size = 32
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        selection = str(Path(tmp) / "selection.pt")
        for phase in ("warmup", "smt", "full"):  # smt needs the warm-up's selection
            argv = [sys.executable, __file__, "--phase", phase, "--selection", selection]
            for key in ("size", "batch", "seq", "steps", "block_size", "ratio", "targets"):
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            results[phase] = json.loads(out.strip().splitlines()[-1])

    warm, smt, full = results["warmup"], results["smt"], results["full"]
    above = {k: r["peak_mib"] - r["model_loaded_mib"] for k, r in results.items()}
    report = {
        "args": {k: v for k, v in vars(args).items() if k not in ("phase", "selection", "json")},
        "phases": results,
        "warmup_vs_smt_peak": warm["peak_mib"] / smt["peak_mib"],
        "full_ft_vs_smt_peak": full["peak_mib"] / smt["peak_mib"],
        "warmup_vs_smt_above_model": above["warmup"] / above["smt"],
        "full_ft_vs_smt_above_model": above["full"] / above["smt"],
    }
    print(
        f"{args.size} Llama, batch {args.batch} x {args.seq}, l={args.block_size}, ratio {args.ratio}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'phase':10} {'peak MiB':>9} {'above model':>12} {'trainable':>11}")
    for phase, r in results.items():
        print(f"{phase:10} {r['peak_mib']:9.0f} {above[phase]:12.0f} {r['trainable']:11d}")
    print(
        f"warm-up / SMT training peak: {report['warmup_vs_smt_peak']:.3f} "
        f"(above the loaded model: {report['warmup_vs_smt_above_model']:.3f})"
    )
    print(f"full fine-tuning / SMT training peak: {report['full_ft_vs_smt_peak']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
