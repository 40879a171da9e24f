"""The two ends of ``benchmarks/gpu.sh``: check the machine first, summarise its results last.

    python benchmarks/gpu_report.py env --device cuda --out OUT/environment.json   # exit 2 if unfit
    python benchmarks/gpu_report.py report OUT                                  # OUT/summary.md

``env`` records the GPU, driver, torch, CUDA, DeepSpeed, transformers and peft versions, and stops
the script at once, with one sentence, when CUDA or a package is missing. ``report`` reads the
JSON the steps wrote and prints one Markdown summary: ``compare.py``'s ratios per size,
``versus.py``'s SMT / LoRA ratios per engine, and ``scale_memory.py``'s peak per phase as a
fraction of the model beside the analytic model's prediction (``analytic.job_phase_memory`` for the
job's shape, batch and budget).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "safetensors", "accelerate")


def environment(device: str) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            sys.exit(f"gpu.sh: {name} is not installed; run `bash scripts/setup.sh` first.")
    import torch

    env = {"device": device, "python": sys.version.split()[0], **versions}
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu.sh: torch sees no CUDA device (a CPU build of torch, or no GPU); nothing was run.")
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(),
        }
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = None
    return env


def report(out: Path) -> str:
    lines = [f"# GPU run in {out}", ""]
    env = _read(out / "environment.json")
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for path in sorted(out.glob("compare_*.json")):
        data = json.loads(path.read_text())
        lines += [
            f"## compare.py: {data['title']}",
            "",
            "| method | trainable % | s/step | vs LoRA | peak GiB | vs LoRA |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for method, r in data["results"].items():
            lines.append(
                f"| {method} | {r['trainable_percent']:.2f} | {r['median_step_s']:.3f} | {r['time_vs_lora']:.2f}x | "
                f"{r['peak_bytes'] / 2**30:.2f} | {r['memory_vs_lora']:.2f}x |"
            )
        lines.append("")
    versus = _read(out / "versus.json")
    if versus:
        lines += [
            f"## versus.py: {versus['title']}",
            "",
            "| engine | pair | step time | peak build | peak train | peak save |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for engine, pairs in versus["smt_over_lora"].items():
            for pair, r in pairs.items():
                lines.append(
                    f"| {engine} | {pair} | {r['step_time']:.2f}x | {r['peak_build']:.2f}x | "
                    f"{r['peak_train']:.2f}x | {r['peak_save']:.2f}x |"
                )
        for engine, methods in versus["results"].items():
            for method, r in methods.items():
                if "failed" in r:
                    lines.append(f"\n{engine} {method} failed: {r['failed']}")
        lines.append("")
    for path in sorted(out.glob("scale_memory*.json")):
        lines += scale_lines(json.loads(path.read_text()))
    return "\n".join(lines) + "\n"


def scale_lines(data: dict) -> list[str]:
    """Measured peak per phase / model bytes, beside the analytic model's, for a one-size run."""
    from analytic import GIB, Shape, job_phase_memory

    (size,) = data["sizes"]
    model_mib = data["model_mib"][size]
    lines = [
        f"## scale_memory.py: {size}, {data['world']} rank(s), {data['device']}, {data['dtype']} "
        f"({model_mib:.0f} MiB): each phase's peak / the model's bytes, measured (analytic)",
        "",
        "| config | load | warmup | build | train | save |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    shape = Shape.from_size(size)
    for config, result in data["configs"].items():
        engine = config.replace("fsdp", "fsdp2")
        # scale_memory.py's job: batch 1 x 64 tokens, SMT at 0.5%
        predicted = job_phase_memory(shape, engine, world=data["world"], tokens_per_gpu=64, fraction=0.005)[
            "gpu"
        ]
        cells = []
        for phase in ("load", "warmup", "build", "train", "save"):
            measured = result["fraction"].get(phase)
            analytic = predicted[phase] * GIB / 2**20 / model_mib
            cells.append("-" if measured is None else f"{measured:.2f} ({analytic:.2f})")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env")
    env.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    env.add_argument("--out", type=Path, required=True)
    summary = commands.add_parser("report")
    summary.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "env":
        text = json.dumps(environment(args.device))  # DeepSpeed prints to stdout: a file of its own
        args.out.write_text(text + "\n")
        print(text)
    else:
        text = report(args.out)
        (args.out / "summary.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
