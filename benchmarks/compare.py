"""SMT against full fine-tuning, LoRA and DoRA: step time, peak memory, trainable parameters.

    python benchmarks/compare.py                     # the small default, a few minutes on 2 cores
    python benchmarks/compare.py --size 119m         # DESIGN.md's 119M reference shape
    python benchmarks/compare.py --size 7b --device cuda   # on a GPU machine (tokens/s, CUDA peak)

Every method runs in its own process (so its peak memory is its own) on the same Llama-shaped
model built from a config, the same batch and the same thread count: full fine-tuning with
``torch.optim.AdamW``; LoRA and DoRA from ``peft`` on q, k, v at the rank whose trainable count
matches SMT at 1%; SMT at 0.5/1/2/5% of the model's parameters with blocks chosen by real warm-up
scoring; and the warm-up alone, once per score (time per micro-batch). A step is forward +
backward + optimizer step; the first ``--warmup-steps`` are not timed. Each method also reports the
activation bytes it keeps for backward (distinct storages packed by saved-tensor hooks, its
parameters excluded). Prints a table of ratios and writes JSON (and, with ``--plots``, two PNGs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from qkv_coverage import column_coverage
from shapes import SIZES, build_llama, random_batches

SMT_RATIOS = (0.005, 0.01, 0.02, 0.05)
TARGETS = ("q_proj", "k_proj", "v_proj")


def batches(args, count: int):
    return random_batches(args.size, count, batch=args.batch, seq=args.seq, device=args.device)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def lora_rank(size: str, trainable: int) -> int:
    """The LoRA rank on q, k, v whose trainable count is nearest ``trainable``."""
    from analytic import Shape

    shape = Shape.from_size(size)
    per_rank = shape.layers * sum(i + o for i, o in shape.qkv_per_layer)
    return max(1, round(trainable / per_rank))


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward, parameters excluded."""
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(storages.values())


def run_method(args) -> dict:
    """One method in this process."""
    import peft  # noqa: F401 - imported by every method so library memory is the same in each

    from smt_dist import (
        BlockSelection,
        SMTConfig,
        apply_smt,
        collect_block_scores,
        count_parameters,
        select_blocks,
    )

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_llama(args.size, args.device).to(dtype)
    total = count_parameters(model)
    loaded = peak_bytes(args.device)
    block = args.block_size
    method, steps = args.method, args.warmup_steps + args.steps
    if method.startswith("warmup"):
        score = method.split("-", 1)[1]
        config = SMTConfig(
            block_size=block, ratio=0.01, warmup_steps=args.smt_warmup, target_modules=TARGETS, score=score
        )
        if args.warmup_steps:  # untimed, as for the training methods
            untimed = SMTConfig(**{**config.to_dict(), "warmup_steps": args.warmup_steps})
            collect_block_scores(model, batches(args, args.warmup_steps), untimed)
        sync(args.device)
        start = time.perf_counter()
        scores = collect_block_scores(model, batches(args, args.smt_warmup), config)
        sync(args.device)
        elapsed = time.perf_counter() - start
        if score == "mean_abs":  # the paper's score selects the blocks of every SMT budget below
            torch.save({name: s.cpu() for name, s in scores.items()}, args.scores)
        return {
            "method": method,
            "trainable": 0,
            "median_step_s": elapsed / args.smt_warmup,
            "tokens_per_s": args.batch * args.seq * args.smt_warmup / elapsed,
            "peak_bytes": peak_bytes(args.device),
            "loaded_bytes": loaded,
            "total_params": total,
        }
    if method.startswith("smt"):
        ratio = float(method.split("-")[1]) / 100
        scores = torch.load(args.scores)
        config = SMTConfig(
            block_size=block, ratio=ratio, warmup_steps=args.smt_warmup, target_modules=TARGETS
        )
        selection = select_blocks(scores, config, total_params=total)
        apply_smt(model, BlockSelection(block_size=block, blocks=selection.blocks), config)
        coverage = column_coverage(model)
    elif method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        rank = args.lora_rank
        model = get_peft_model(
            model,
            LoraConfig(
                r=rank,
                lora_alpha=2 * rank,
                target_modules=list(TARGETS),
                lora_dropout=0.0,
                use_dora=method == "dora",
            ),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = timed_steps(model, optimizer, batches(args, steps), device=args.device, untimed=args.warmup_steps)
    median = statistics.median(times)
    result = {
        "method": method,
        "trainable": sum(p.numel() for p in params),
        "median_step_s": median,
        "tokens_per_s": args.batch * args.seq / median,
        "peak_bytes": peak_bytes(args.device),
        "loaded_bytes": loaded,
        "total_params": total,
        "saved_activation_bytes": saved_activation_bytes(model, next(iter(batches(args, 1)))),
    }
    if method.startswith("smt"):
        result["coverage"] = coverage
    return result


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(model, optimizer, batches, *, device: str, untimed: int) -> list[float]:
    """Seconds of each training step (forward, backward, optimizer step) after the first ``untimed``."""
    times = []
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= untimed:
            times.append(time.perf_counter() - start)
    return times


def calibrate(threads: int) -> dict[str, float]:
    """This machine's fp32 GEMM throughput and copy bandwidth, for the analytic prediction."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    big = torch.empty(64 * 2**20 // 4)

    def best(fn, repeats=5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    gemm = best(lambda: [a @ b for _ in range(20)])
    copy = best(lambda: big.clone())
    return {"gflops": 20 * 2 * 512 * 1024 * 1024 / gemm / 1e9, "copy_gbps": 2 * big.numel() * 4 / copy / 1e9}


def predicted_seconds(args, method: str, trainable: int, rank: int, machine: dict) -> float | None:
    """FLOPs at the calibrated GEMM rate plus AdamW's 28 bytes per trainable parameter."""
    from analytic import Shape, step_flops

    kind = method.split("-")[0]
    if kind == "warmup":
        return None
    model = Shape.from_size(args.size)
    kwargs = {"fraction": float(method.split("-")[1]) / 100} if kind == "smt" else {"rank": rank}
    flops = step_flops(model, kind, tokens=args.batch * args.seq, seq=args.seq, **kwargs)
    return flops / (machine["gflops"] * 1e9) + 28 * trainable / (machine["copy_gbps"] * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=None, help="default: 256, or 64 below 119m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds of every method; medians over them"
    )
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    parser.add_argument("--smt-warmup", type=int, default=4, help="SMT warm-up micro-batches")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="models and training in bf16 (GPU)")
    parser.add_argument("--plots", type=Path, default=None, help="directory for the two PNG plots")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/compare.json"))
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    parser.add_argument("--lora-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--from-json", type=Path, help="replot an earlier run's JSON into --plots and exit")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        plot(report["results"], args.plots or Path("docs/img"), title=report["title"])
        return
    if args.block_size is None:
        args.block_size = 256 if args.size in ("119m", "1b", "7b") else 64
    if args.method:
        print(json.dumps(run_method(args)))
        return

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scores = str(Path(tmp) / "scores.pt")

        def child(method: str, lora_rank: int = 0) -> dict:
            argv = [
                sys.executable,
                __file__,
                "--method",
                method,
                "--scores",
                scores,
                "--lora-rank",
                str(lora_rank),
            ]
            for key in (
                "size",
                "batch",
                "seq",
                "block_size",
                "steps",
                "warmup_steps",
                "smt_warmup",
                "threads",
                "device",
            ):
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            if args.bf16:
                argv.append("--bf16")
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(
                f"  {method:10} {result['median_step_s']:.3f} s/step, peak {result['peak_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
            return result

        # Rounds interleave the methods, so a slow spell of the machine hits every method alike;
        # each method's figures are its medians over the rounds.
        rounds: dict[str, list[dict]] = {}
        rank = None
        for round_ in range(args.rounds):
            if args.rounds > 1:
                print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for method in (
                "warmup-mean_abs",
                "warmup-abs_mean",
                "full",
                *(f"smt-{r * 100:g}" for r in SMT_RATIOS),
            ):
                rounds.setdefault(method, []).append(child(method))
            if rank is None:
                rank = lora_rank(args.size, rounds["smt-1"][0]["trainable"])
            for method in ("lora", "dora"):
                rounds.setdefault(method, []).append(child(method, rank))
        for method, runs in rounds.items():
            results[method] = {
                key: statistics.median(run[key] for run in runs)
                if isinstance(runs[0][key], (int, float))
                else runs[0][key]
                for key in runs[0]
            }
            results[method]["rounds"] = [run["median_step_s"] for run in runs]

    machine = calibrate(args.threads)
    for method, result in results.items():
        result["predicted_s"] = predicted_seconds(args, method, result["trainable"], rank, machine)
    full, lora = results["full"], results["lora"]
    for result in results.values():
        result["trainable_percent"] = 100 * result["trainable"] / result["total_params"]
        result["time_vs_full"] = result["median_step_s"] / full["median_step_s"]
        result["time_vs_lora"] = result["median_step_s"] / lora["median_step_s"]
        result["memory_vs_full"] = result["peak_bytes"] / full["peak_bytes"]
        result["memory_vs_lora"] = result["peak_bytes"] / lora["peak_bytes"]
        result["added_bytes"] = result["peak_bytes"] - result["loaded_bytes"]  # what the method adds
        result["added_vs_full"] = result["added_bytes"] / (full["peak_bytes"] - full["loaded_bytes"])
        result["added_vs_lora"] = result["added_bytes"] / (lora["peak_bytes"] - lora["loaded_bytes"])
        if "saved_activation_bytes" in result:
            result["saved_vs_lora"] = result["saved_activation_bytes"] / lora["saved_activation_bytes"]
    smt_times = [results[f"smt-{r * 100:g}"]["median_step_s"] for r in SMT_RATIOS]
    summary = {
        "lora_rank": rank,
        "smt_time_growth_0.5_to_5": smt_times[-1] / smt_times[0],
        "warmup_vs_smt1_memory": results["warmup-mean_abs"]["peak_bytes"] / results["smt-1"]["peak_bytes"],
        "warmup_vs_smt1_time": {
            score: results[f"warmup-{score}"]["median_step_s"] / results["smt-1"]["median_step_s"]
            for score in ("mean_abs", "abs_mean")
        },
        "smt1_coverage": results["smt-1"]["coverage"],
    }
    print(
        f"\n{args.size} Llama ({full['total_params']:,} parameters), batch {args.batch} x {args.seq}, "
        f"{args.threads} threads, {args.device}, l={args.block_size}, LoRA/DoRA rank {rank}"
    )
    print(
        f"{'method':16} {'trainable %':>11} {'s/step':>8} {'/full':>7} {'/LoRA':>7} {'peak GiB':>9} {'/full':>7} "
        f"{'/LoRA':>7} {'added GiB':>10} {'/full':>7} {'/LoRA':>7} {'saved MiB':>10} {'/LoRA':>7}"
    )
    for name, r in results.items():
        saved = r.get("saved_activation_bytes")
        saved_cells = (
            f"{saved / 2**20:10.1f} {r['saved_vs_lora']:7.3f}" if saved is not None else f"{'-':>10} {'-':>7}"
        )
        print(
            f"{name:16} {r['trainable_percent']:11.3f} {r['median_step_s']:8.3f} {r['time_vs_full']:7.3f} "
            f"{r['time_vs_lora']:7.3f} {r['peak_bytes'] / 2**30:9.3f} {r['memory_vs_full']:7.3f} "
            f"{r['memory_vs_lora']:7.3f} {r['added_bytes'] / 2**30:10.3f} {r['added_vs_full']:7.3f} "
            f"{r['added_vs_lora']:7.3f} {saved_cells}"
        )
    print(
        f"analytic prediction ({machine['gflops']:.0f} GFLOP/s GEMM, {machine['copy_gbps']:.1f} GB/s copy):"
    )
    for name, r in results.items():
        if r["predicted_s"]:
            print(
                f"  {name:10} predicted {r['predicted_s']:.3f} s, measured / predicted {r['median_step_s'] / r['predicted_s']:.3f}"
            )
    print(
        f"SMT step time 5% / 0.5%: {summary['smt_time_growth_0.5_to_5']:.3f}; "
        f"warm-up (mean_abs) peak / SMT-1% peak: {summary['warmup_vs_smt1_memory']:.3f}; warm-up time per "
        "micro-batch / SMT-1% step: "
        + ", ".join(f"{score} {ratio:.3f}" for score, ratio in summary["warmup_vs_smt1_time"].items())
    )
    coverage = summary["smt1_coverage"]
    print(
        f"SMT-1% q/k/v input per layer: {coverage['copies']:.3f} in separate copies, {coverage['kept']:.3f} "
        f"kept with sharing; {coverage['layers_with_blocks']:.2f} of the layers have blocks"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("method", "scores", "lora_rank")},
        "results": results,
        "summary": summary,
        "machine": machine,
        "title": f"{args.size} Llama, batch {args.batch} x {args.seq}, {args.device}{', bf16' if args.bf16 else ''}",
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    if args.plots:
        plot(results, args.plots, title=report["title"])


def plot(results: dict, directory: Path, *, title: str) -> None:
    """Step time and peak memory against trainable %, one line (or point) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    smt = [results[k] for k in results if k.startswith("smt")]
    for key, label, scale, name in (
        ("median_step_s", "step time (s)", 1, "step_time.png"),
        ("peak_bytes", "peak memory (GiB)", 2**30, "peak_memory.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["trainable_percent"] for r in smt], [r[key] / scale for r in smt], "o-", label="SMT")
        for method, marker in (("lora", "s"), ("dora", "^"), ("full", "D")):
            r = results[method]
            ax.plot(
                [r["trainable_percent"]],
                [r[key] / scale],
                marker,
                label={"lora": "LoRA", "dora": "DoRA", "full": "full FT"}[method],
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (%)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
    print(f"wrote {directory / 'step_time.png'} and {directory / 'peak_memory.png'}")


if __name__ == "__main__":
    main()
