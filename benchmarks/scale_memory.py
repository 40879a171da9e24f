"""Does any phase of the job hold the whole frozen model on one rank? Growth of a rank's peak per MiB of model.

    python benchmarks/scale_memory.py                      # 2 ranks, every engine, ~25 minutes
    python benchmarks/scale_memory.py --world 4 --configs zero3,fsdp
    python benchmarks/scale_memory.py --sizes tiny,small   # a smoke run in a minute or two
    python benchmarks/scale_memory.py --device cuda --world 1 --sizes 7b --bf16 \
        --configs zero3_offload,fsdp_offload             # one GPU: each phase's CUDA peak / model

Runs ``launch/train.py`` through its real launcher on two Llama shapes built from configs and
saved as bf16 safetensors (so fp32 training must make its own copy: nothing a rank holds can hide
in shared page cache), with ``--save_steps``, ``--merge`` and ``--report_memory``, for ZeRO-2,
ZeRO-3, ZeRO-3 with parameter offload, FSDP2 and FSDP2 with CPU offload. Each rank reports its peak
per phase: anonymous resident memory on the CPU, ``max_memory_allocated`` on a GPU. What is printed
and written to JSON is how a rank's peak grows per MiB of model (fp32 bytes), phase by phase and
over the whole job: about ``1/world`` when the frozen model is partitioned, 1 or more when some
phase materialises it on one rank. ZeRO-2 replicates it by design. Given one size, it prints each
phase's peak as a fraction of the model's bytes instead (on a GPU with offload: how much of the
frozen model ever reaches the device).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shapes import SIZES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    "zero2": ["--deepspeed", "configs/zero2_smt.json"],
    "zero3": ["--deepspeed", "configs/zero3_smt.json"],
    "zero3_offload": ["--deepspeed", "configs/zero3_offload_smt.json"],
    "fsdp": ["--backend", "fsdp"],
    "fsdp_offload": ["--backend", "fsdp", "--fsdp_cpu_offload"],
}
PHASES = ("load", "warmup", "build", "train", "save", "merge")


def make_checkpoint(size: str, directory: Path, *, shard_mb: int, device: str) -> float:
    """Save a randomly initialised Llama of ``size`` as bf16 safetensors; return its fp32 MiB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=512, tie_word_embeddings=False)
    marker = directory / "fp32_mib.json"
    if not marker.is_file():
        shutil.rmtree(directory, ignore_errors=True)
        torch.manual_seed(0)
        with torch.device(device):  # random init of billions of weights is quick on a GPU
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(directory, safe_serialization=True, max_shard_size=f"{shard_mb}MB")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # ids stay below every vocab here
            shutil.copy(ROOT / "models" / "tiny-llama" / name, directory / name)
        params = sum(p.numel() for p in model.parameters())
        marker.write_text(json.dumps({"fp32_mib": params * 4 / 2**20}))
    return json.loads(marker.read_text())["fp32_mib"]


def launch(config: str, model_dir: Path, output_dir: Path, *, world: int, bf16: bool) -> list[str]:
    """The launch command of one run (deepspeed's launcher or torchrun)."""
    port = str(29500 + (os.getpid() + int(time.time())) % 2000)
    job = [
        str(ROOT / "launch" / "train.py"),
        *CONFIGS[config],
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--save_total_limit",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--max_seq_length",
        "64",
        "--smt_block_size",
        "64",
        "--smt_ratio",
        "0.005",
        "--smt_warmup_steps",
        "2",
        "--merge",
        "--report_memory",
        "--disable_tqdm",
        *(["--bf16"] if bf16 else []),
    ]
    if config.startswith("zero"):
        return ["deepspeed", "--num_gpus", str(world), "--master_port", port, *job]
    return ["torchrun", "--nproc_per_node", str(world), "--master_port", port, *job]


def run(config: str, model_dir: Path, *, world: int, device: str, bf16: bool) -> dict[str, float]:
    """Peak MiB per phase, the maximum over ranks, of one run."""
    with tempfile.TemporaryDirectory(prefix="smt-scale-") as tmp:
        output_dir = Path(tmp) / "out"
        # A fixed mmap threshold makes glibc return every freed buffer over 64 KiB to the system
        # at once; with its default, dynamic threshold freed gathers linger in the heap, and RSS
        # would measure the allocator's history rather than the tensors alive (what a GPU's
        # max_memory_allocated counts).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(
            launch(config, model_dir, output_dir, world=world, bf16=bf16),
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{config} on {model_dir.name} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        report = json.loads((output_dir / "memory.json").read_text())
    key = "cuda_mib" if device == "cuda" else "host_mib"
    peaks = {}
    for phase in PHASES:
        values = [rank[phase][key] for rank in report["ranks"] if phase in rank and key in rank[phase]]
        if values:
            peaks[phase] = max(values)
    peaks["job"] = max(peaks.values())
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="deep111m,deep427m", help="Two sizes (or one) from benchmarks/shapes.py."
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--bf16", action="store_true", help="Train in bf16 (the model's bytes then count 2 per weight)."
    )
    parser.add_argument("--shard_mb", type=int, default=200, help="Shard size of the saved checkpoints.")
    parser.add_argument("--models_dir", default=str(RESULTS / "scale_models"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    if len(sizes) not in (1, 2):
        parser.error("--sizes takes one or two sizes")
    models = {size: Path(args.models_dir) / size for size in sizes}
    fp32 = {
        size: make_checkpoint(size, path, shard_mb=args.shard_mb, device=args.device)
        for size, path in models.items()
    }
    mib = {size: value / 2 if args.bf16 else value for size, value in fp32.items()}
    dtype = "bf16" if args.bf16 else "fp32"
    print(
        f"models: {', '.join(f'{s} {mib[s]:.0f} MiB {dtype}' for s in sizes)}; {args.world} ranks, {args.device}"
    )
    results = {
        "sizes": sizes,
        "model_mib": mib,
        "dtype": dtype,
        "world": args.world,
        "device": args.device,
        "configs": {},
    }
    columns = (*PHASES, "job")
    if len(sizes) == 2:
        print("| config | " + " | ".join(f"{p} MiB/MiB" for p in columns) + " | job peak small / large MiB |")
        print("|" + " --- |" * (len(columns) + 2))
    else:
        print("| config | " + " | ".join(f"{p} / model" for p in columns) + " | job peak MiB |")
        print("|" + " --- |" * (len(columns) + 2))
    for config in args.configs.split(","):
        peaks = {
            size: run(config, models[size], world=args.world, device=args.device, bf16=args.bf16)
            for size in sizes
        }
        if len(sizes) == 2:
            delta = mib[sizes[1]] - mib[sizes[0]]
            ratio = {
                p: (peaks[sizes[1]][p] - peaks[sizes[0]][p]) / delta
                for p in columns
                if p in peaks[sizes[0]] and p in peaks[sizes[1]]
            }
            last = f"{peaks[sizes[0]]['job']:.0f} / {peaks[sizes[1]]['job']:.0f}"
        else:
            ratio = {p: peaks[sizes[0]][p] / mib[sizes[0]] for p in columns if p in peaks[sizes[0]]}
            last = f"{peaks[sizes[0]]['job']:.0f}"
        results["configs"][config] = {"peaks": peaks, "growth" if len(sizes) == 2 else "fraction": ratio}
        cells = " | ".join(f"{ratio[p]:.2f}" if p in ratio else "-" for p in columns)
        print(f"| {config} | {cells} | {last} |", flush=True)
    out = Path(args.out) if args.out else RESULTS / f"scale_memory_{args.device}_w{args.world}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
