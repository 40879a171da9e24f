"""SMT against peft LoRA (and DoRA) under the same engine: ZeRO-2, ZeRO-3, FSDP2, side by side.

    python benchmarks/versus.py                               # small Llama, 2 ranks, ~10 minutes
    python benchmarks/versus.py --size 119m --rounds 2        # DESIGN.md's 119M shape
    python benchmarks/versus.py --size deep427m --engines zero3,fsdp
    python benchmarks/versus.py --device cuda --world 1 --size 7b --bf16   # one GPU

Each (engine, method) runs as its own ``torchrun`` job of ``--world`` ranks on the same Llama built
from a config (the same weights on every rank; under ZeRO-3 built inside ``deepspeed.zero.Init``,
as ``from_pretrained`` does), the same random batches, and torch's AdamW over the trainable
parameters. Each method starts the way its users start it: SMT through
``smt_dist.deepspeed.prepare`` (its warm-up picks the blocks) and ``smt_dist.deepspeed.initialize``
or ``shard_model`` + AdamW; LoRA and DoRA through ``peft.get_peft_model`` on q, k, v at the rank
whose trainable count matches SMT's, then ``deepspeed.initialize`` or the same ``shard_model`` +
AdamW. Rounds alternate the methods, so a slow spell of the machine hits each alike.

Per engine and method: the median step time (forward, backward, optimizer step), each rank's peak
memory per phase (``build``: the model, the adapter or warm-up and the engine; ``train``;
``save``; anonymous RSS on the CPU, ``max_memory_allocated`` on a GPU), the warm-up's time, and the
adapter's bytes and save time (only the trainable parameters, gathered where partitioned, written
by rank 0). Printed as ratios SMT / LoRA at the same trainable count, and written to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from compare import TARGETS, lora_rank  # noqa: E402
from shapes import SIZES, build_llama, random_batches  # noqa: E402

ENGINES = ("zero2", "zero3", "fsdp")
METHODS = ("smt-1", "lora-1", "smt-5", "lora-5", "dora-1")
PHASES = ("build", "train", "save")


# ---- one (engine, method) on one rank --------------------------------------------------------


def worker(args) -> None:
    import torch.distributed as dist

    from smt_dist.distributed.launch import init_process_group
    from smt_dist.recipes.memory import PhaseMemory

    torch.set_num_threads(args.threads)
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    memory = PhaseMemory(enabled=True)
    kind, percent = args.method.split("-")
    result: dict = {"engine": args.engine, "method": args.method, "rank": rank}
    with memory.phase("build"):
        model, step, trainable, warmup_s = build(args, kind, float(percent) / 100, device, dtype, world)
    result["warmup_s"] = warmup_s
    result["trainable"] = trainable
    count = args.warmup_steps + args.steps
    batches = random_batches(args.size, count, batch=args.batch, seq=args.seq, device=device, seed=2)
    times = []
    with memory.phase("train"):
        for i, batch in enumerate(batches):
            sync(device)
            start = time.perf_counter()
            step(batch)
            sync(device)
            if i >= args.warmup_steps:
                times.append(time.perf_counter() - start)
    with memory.phase("save"):
        sync(device)
        start = time.perf_counter()
        result["adapter_bytes"] = save_adapter(args, kind, model, Path(args.out_dir))
        dist.barrier()
        result["save_s"] = time.perf_counter() - start
    result["median_step_s"] = statistics.median(times)
    memory.close()
    measure = "cuda_mib" if device.type == "cuda" else "host_mib"
    result["peak_mib"] = {
        phase: entry[measure] for phase, entry in memory.report().items() if phase in PHASES
    }
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


def ds_config(args, stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": args.bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, for both methods
        "steps_per_print": 10**9,
    }


def build(args, kind: str, fraction: float, device, dtype, world: int):
    """The model as the method's users set it up, and its training step: (model, step, trainable, warm-up s)."""
    import contextlib

    import deepspeed
    import transformers.models.llama.modeling_llama  # noqa: F401  # imported outside zero.Init's patching

    from smt_dist import SMTConfig, count_parameters
    from smt_dist.core.selection import budget_in_blocks

    stage = {"zero2": 2, "zero3": 3}.get(args.engine)
    config = ds_config(args, stage) if stage is not None else None
    init = deepspeed.zero.Init(config_dict_or_path=config) if stage == 3 else contextlib.nullcontext()
    with init:
        model = build_llama(args.size, "cpu" if stage == 3 else device).to(dtype)
    model.train()
    total = count_parameters(model)
    block = args.block_size
    smt_config = SMTConfig(
        block_size=block,
        ratio=fraction if kind == "smt" else 0.01,
        warmup_steps=args.smt_warmup,
        target_modules=TARGETS,
    )
    warmup_s = 0.0
    if kind == "smt":
        import smt_dist.deepspeed as smt_deepspeed

        warmup = random_batches(
            args.size, args.smt_warmup, batch=args.batch, seq=args.seq, device=device, seed=1
        )
        sync(device)
        start = time.perf_counter()
        model = smt_deepspeed.prepare(model, warmup, smt_config, config=config, merge_on_save=False)
        sync(device)
        warmup_s = time.perf_counter() - start
    else:
        from peft import LoraConfig, get_peft_model

        blocks = budget_in_blocks(
            SMTConfig(**{**smt_config.to_dict(), "ratio": fraction}), total_params=total
        )
        rank = lora_rank(args.size, blocks * block * block)
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(TARGETS),
            lora_dropout=0.0,
            use_dora=kind == "dora",
        )
        model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if stage is not None:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        initialize = smt_deepspeed_initialize if kind == "smt" else deepspeed.initialize
        engine, *_ = initialize(model=model, optimizer=optimizer, config=config)

        def step(batch):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()

        return model, step, trainable, warmup_s
    from smt_dist.engines.fsdp import shard_model

    shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(batch):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, trainable, warmup_s


def smt_deepspeed_initialize(**kwargs):
    import smt_dist.deepspeed as smt_deepspeed

    return smt_deepspeed.initialize(**kwargs)


def save_adapter(args, kind: str, model, out_dir: Path) -> int:
    """Write the trainable parameters the method's users keep; returns the bytes on disk (rank 0)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from smt_dist import SMTConfig, save_smt_adapter
    from smt_dist.distributed.params import full_value

    target = out_dir / f"{args.engine}-{args.method}"
    if kind == "smt":
        save_smt_adapter(model, target, config=SMTConfig(block_size=args.block_size, num_blocks=1))
    else:  # what peft's get_peft_model_state_dict holds: the adapter's parameters, whole
        tensors = {
            name: full_value(p).contiguous() for name, p in model.named_parameters() if p.requires_grad
        }
        if dist.get_rank() == 0:
            target.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(target / "adapter_model.safetensors"))
    if dist.get_rank() != 0:
        return 0
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- the driver ---------------------------------------------------------------------------------


def launch(args, engine: str, method: str, out_dir: Path) -> list[dict]:
    command = [
        "torchrun", "--nproc_per_node", str(args.world), "--master_port", str(free_port()), __file__,
        "--worker", "--engine", engine, "--method", method, "--out-dir", str(out_dir),
        "--size", args.size, "--batch", str(args.batch), "--seq", str(args.seq),
        "--block-size", str(args.block_size), "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps), "--smt-warmup", str(args.smt_warmup),
        "--threads", str(args.threads), "--device", args.device,
    ] + (["--bf16"] if args.bf16 else [])  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory goes back: peaks are per phase
    for _ in range(2):  # a second try on a new port: the rendezvous port is sometimes taken
        command[command.index("--master_port") + 1] = str(free_port())
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode == 0 and lines:
            return json.loads(lines[-1].removeprefix("RESULT "))
    # recorded, not raised: the other pairs still run
    output = (done.stdout + done.stderr).splitlines()
    errors = [line.strip() for line in output if re.search(r"\w+(Error|Exception): ", line)]
    return {"failed": (errors or output[-1:] or ["no output"])[-1][:300]}


def summarise(runs: list[list[dict]]) -> dict:
    """One (engine, method) over its rounds: medians, and each rank's peak per phase (highest round)."""
    first = runs[0]
    return {
        "trainable": first[0]["trainable"],
        "median_step_s": statistics.median(r[0]["median_step_s"] for r in runs),
        "warmup_s": statistics.median(r[0]["warmup_s"] for r in runs),
        "save_s": statistics.median(r[0]["save_s"] for r in runs),
        "adapter_bytes": first[0]["adapter_bytes"],
        "peak_mib": [
            {phase: max(r[rank]["peak_mib"].get(phase, 0.0) for r in runs) for phase in PHASES}
            for rank in range(len(first))
        ],
        "rounds": [r[0]["median_step_s"] for r in runs],
    }


def ratios(smt: dict, lora: dict) -> dict:
    def peak(result, phase):
        return max(rank[phase] for rank in result["peak_mib"])

    return {
        "trainable": smt["trainable"] / lora["trainable"],
        "step_time": smt["median_step_s"] / lora["median_step_s"],
        **{f"peak_{phase}": peak(smt, phase) / peak(lora, phase) for phase in PHASES},
        # the job's peak, what decides whether it fits: SMT's warm-up falls in its build phase
        "peak_job": max(peak(smt, p) for p in PHASES) / max(peak(lora, p) for p in PHASES),
        "adapter_bytes": smt["adapter_bytes"] / lora["adapter_bytes"],
        "save_time": smt["save_s"] / lora["save_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=None, help="default: 256, or 64 below 119m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    parser.add_argument("--smt-warmup", type=int, default=4, help="SMT warm-up micro-batches")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="per rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "versus.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--plot", type=Path, default=None, help="write the SMT / LoRA ratios as a PNG here")
    parser.add_argument("--from-json", type=Path, help="replot an earlier run's JSON into --plot and exit")
    args = parser.parse_args()
    if args.from_json:
        plot(json.loads(args.from_json.read_text()), args.plot or ROOT / "docs" / "img" / "versus.png")
        return
    if args.block_size is None:
        args.block_size = 256 if args.size in ("119m", "deep427m", "1b", "7b", "13b", "70b") else 64
    if args.worker:
        worker(args)
        return
    engines, methods = args.engines.split(","), args.methods.split(",")
    unknown = sorted(set(engines) - set(ENGINES)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown engines or methods: {', '.join(unknown)}")
    started = time.perf_counter()
    runs: dict[tuple[str, str], list] = {}
    failed: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for engine in engines:
                for method in methods:  # alternating: SMT, LoRA, SMT, LoRA, ...
                    if (engine, method) in failed:
                        continue
                    result = launch(args, engine, method, Path(tmp))
                    if "failed" in result:
                        failed[(engine, method)] = result["failed"]
                        print(
                            f"round {round_ + 1} {engine:6} {method:7} failed: {result['failed']}", flush=True
                        )
                        continue
                    runs.setdefault((engine, method), []).append(result)
                    print(
                        f"round {round_ + 1} {engine:6} {method:7} {result[0]['median_step_s']:.3f} s/step, "
                        f"train peak rank 0 {result[0]['peak_mib'].get('train', 0):.0f} MiB",
                        flush=True,
                    )
    results = {
        engine: {
            m: {"failed": failed[(engine, m)]} if (engine, m) in failed else summarise(runs[(engine, m)])
            for m in methods
        }
        for engine in engines
    }
    compared = {
        engine: {
            f"smt-{p}/lora-{p}": ratios(results[engine][f"smt-{p}"], results[engine][f"lora-{p}"])
            for p in ("1", "5")
            if all(m in methods and "failed" not in results[engine][m] for m in (f"smt-{p}", f"lora-{p}"))
        }
        for engine in engines
    }
    print(
        f"\n{args.size} Llama, {args.world} ranks, batch {args.batch} x {args.seq}, {args.device}, l={args.block_size}"
    )
    header = [
        "engine",
        "pair",
        "trainable",
        "step time",
        *(f"peak {p}" for p in PHASES),
        "peak job",
        "adapter",
        "save",
    ]
    print(" | ".join(header))
    for engine, pairs in compared.items():
        for pair, r in pairs.items():
            row = [
                r["trainable"],
                r["step_time"],
                *(r[f"peak_{p}"] for p in PHASES),
                r["peak_job"],
                r["adapter_bytes"],
                r["save_time"],
            ]
            print(" | ".join([engine, pair, *(f"{v:.2f}x" for v in row)]))
    for engine in engines:
        for method in methods:
            if "failed" in results[engine][method]:
                print(f"{engine} {method} failed: {results[engine][method]['failed']}")
            elif method.startswith("smt"):
                print(f"{engine} {method} warm-up {results[engine][method]['warmup_s']:.1f} s")
    report = {
        "title": f"{args.size} Llama, {args.world} ranks, batch {args.batch} x {args.seq}, {args.device}",
        "args": {
            k: v for k, v in vars(args).items() if k not in ("worker", "engine", "method", "out_dir", "json")
        },
        "wall_s": time.perf_counter() - started,
        "results": results,
        "smt_over_lora": compared,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))  # --plot is a Path
    print(f"wrote {args.json} ({report['wall_s']:.0f} s)")
    if args.plot:
        plot(report, args.plot)


def plot(report: dict, path: Path) -> None:
    """Grouped bars: SMT / LoRA per engine and budget, for step time and each phase's peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [
        ("step_time", "step time"),
        *((f"peak_{p}", f"peak {p}") for p in PHASES),
        ("peak_job", "job peak"),
    ]
    groups = [(engine, pair) for engine, pairs in report["smt_over_lora"].items() for pair in pairs]
    figure, axes = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(measures)
    for i, (key, label) in enumerate(measures):
        values = [report["smt_over_lora"][engine][pair][key] for engine, pair in groups]
        axes.bar(
            [g + (i - (len(measures) - 1) / 2) * width for g in range(len(groups))],
            values,
            width,
            label=label,
        )
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), [f"{engine}\n{pair.split('/')[0]}" for engine, pair in groups])
    axes.set_ylabel("SMT / LoRA (same trainable count)")
    axes.set_title(report["title"], fontsize=9)
    axes.legend(fontsize=8, ncols=len(measures))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
