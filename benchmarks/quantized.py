"""SMT against QLoRA on the same 4-bit base: step time, peak memory, the selection, accuracy.

    python benchmarks/quantized.py                          # 119M shape, ~10 minutes on 2 cores
    python benchmarks/quantized.py --size small --skip-accuracy      # a minute
    python benchmarks/quantized.py --device cuda --size 7b --bf16    # one GPU

Speed and memory: one process per method (so its peak is its own), alternating over
``--rounds``, on a Llama of ``--size`` built from a config, saved as safetensors and loaded by
transformers with ``BitsAndBytesConfig`` (NF4 by default) as QLoRA users load theirs; the same
random batches and AdamW over the trainable parameters. ``smt-nf4`` warms up on the 4-bit base
and trains ``--percent`` of the parameters as blocks on q, k, v; ``qlora-nf4`` is peft's LoRA on
q, k, v at the rank with the same trainable count; ``smt-fp32`` is SMT on the float base (what the
4-bit base saves). A step is forward + backward + optimizer step; peaks are anonymous RSS on the
CPU (``MALLOC_MMAP_THRESHOLD_=65536``), ``max_memory_allocated`` on a GPU, per phase (``build``:
load, warm-up, adapter; ``train``). Ratios are printed SMT / QLoRA.

Selection: how far the quantization error moves the warm-up's choice. The same warm-up batches
on the float base and on its NF4, FP4 and int8 copies, at 1% and 5%: the Jaccard index of the
selected blocks (shared / either), on the shipped models.

Accuracy: ``benchmarks/quality.py``'s study (its tasks, training and answer rules), on the
world model loaded in 4 bits, LoRA (QLoRA) and SMT at LoRA r=4's count, one rate and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from compare import lora_rank, timed_steps  # noqa: E402
from shapes import build_llama, random_batches  # noqa: E402

METHODS = ("smt-nf4", "qlora-nf4", "smt-fp32")
QKV = ("q_proj", "k_proj", "v_proj")
KINDS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
         "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
         "int8": dict(load_in_8bit=True)}  # fmt: skip


def load(model_dir: Path, kind: str | None, dtype: torch.dtype, device: str):
    """The model as its users load it: float, or quantized by transformers as it loads."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind is None:  # copied out of the file's mapped pages, as a GPU would hold it
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
        return model
    options = dict(KINDS[kind])
    if "load_in_4bit" in options:
        options["bnb_4bit_compute_dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map={"": device}, quantization_config=BitsAndBytesConfig(**options)
    )


# ---- speed and memory: one method in its own process -------------------------------------------


def worker(args) -> None:
    from smt_dist import SMTConfig, apply_smt, choose_blocks
    from smt_dist.core.quantized import keep_layout
    from smt_dist.recipes.memory import PhaseMemory

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    method, kind = args.method.split("-")
    memory = PhaseMemory(enabled=True)
    batches = list(random_batches(
        args.size, args.smt_warmup + args.warmup_steps + args.steps, batch=args.batch, seq=args.seq,
        device=args.device, seed=2,
    ))  # fmt: skip
    result: dict = {"method": args.method}
    with memory.phase("build"):
        model = load(Path(args.model_dir), None if kind == "fp32" else kind, dtype, args.device)
        keep_layout(model)
        model.train()
        model.config.use_cache = False
        total = sum(p.numel() for p in build_llama(args.size, "meta").parameters())
        budget = round(args.percent / 100 * total / args.block_size**2)
        if method == "smt":
            config = SMTConfig(block_size=args.block_size, target_modules=list(QKV), num_blocks=budget,
                               warmup_steps=args.smt_warmup)  # fmt: skip
            start = time.perf_counter()
            selection, _ = choose_blocks(model, iter(batches), config)
            result["warmup_s"] = time.perf_counter() - start
            apply_smt(model, selection, config, blocks_dtype=dtype)
        else:
            from peft import LoraConfig, get_peft_model

            rank = lora_rank(args.size, budget * args.block_size**2)
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(QKV)))
            result["lora_rank"] = rank
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    result["trainable"] = sum(p.numel() for p in params)
    with memory.phase("train"):
        times = timed_steps(
            model, optimizer, batches[args.smt_warmup :], device=args.device, untimed=args.warmup_steps
        )
    memory.close()
    result["step_s"] = statistics.median(times)
    result["peaks_mib"] = memory.report()
    print("RESULT " + json.dumps(result), flush=True)


def run_method(args, method: str, model_dir: Path) -> dict:
    command = [sys.executable, __file__, "--worker", "--method", method, "--model-dir", str(model_dir),
               *forwarded(args)]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"quantized.py: {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def forwarded(args) -> list[str]:
    names = ("size", "batch", "seq", "steps", "warmup_steps", "smt_warmup", "percent", "block_size",
             "threads", "device")  # fmt: skip
    out = [token for name in names for token in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return out + (["--bf16"] if args.bf16 else [])


def peak(result: dict, phase: str) -> float:
    entry = result["peaks_mib"].get(phase, {})
    return entry.get("cuda_mib", entry.get("host_mib", float("nan")))


def speed_and_memory(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="smt-quantized-") as tmp:
        model_dir = Path(tmp) / "model"
        build_llama(args.size).save_pretrained(model_dir, safe_serialization=True)
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for round_ in range(args.rounds):
            for method in args.methods if round_ % 2 == 0 else reversed(args.methods):
                runs[method].append(run_method(args, method, model_dir))
                print(f"round {round_} {method}: {runs[method][-1]['step_s']:.3f} s/step, "
                      f"train peak {peak(runs[method][-1], 'train'):.0f} MiB", flush=True)  # fmt: skip
    report = {}
    for method, results in runs.items():
        report[method] = {
            "trainable": results[0]["trainable"],
            "step_s": statistics.median(r["step_s"] for r in results),
            "build_peak_mib": max(peak(r, "build") for r in results),
            "train_peak_mib": max(peak(r, "train") for r in results),
            **({"lora_rank": results[0]["lora_rank"]} if "lora_rank" in results[0] else {}),
            **(
                {"warmup_s": statistics.median(r["warmup_s"] for r in results)}
                if "warmup_s" in results[0]
                else {}
            ),
        }
    if {"smt-nf4", "qlora-nf4"} <= set(report):
        smt, lora = report["smt-nf4"], report["qlora-nf4"]
        report["smt_over_qlora"] = {
            key: smt[key] / lora[key] for key in ("trainable", "step_s", "build_peak_mib", "train_peak_mib")
        }
    if {"smt-nf4", "smt-fp32"} <= set(report):
        report["nf4_over_fp32_smt"] = {
            key: report["smt-nf4"][key] / report["smt-fp32"][key] for key in ("step_s", "train_peak_mib")
        }
    return report


# ---- selection: the warm-up on the float base and its quantized copies -------------------------


def selection_agreement(args) -> dict:
    from smt_dist import SMTConfig, choose_blocks
    from smt_dist.recipes.data import collate, load_tokenizer, read_records, tokenize_records

    torch.set_num_threads(args.threads)
    out = {}
    for name in args.selection_models:
        model_dir = ROOT / "models" / name
        tokenizer = load_tokenizer(model_dir)
        examples, _ = tokenize_records(read_records(ROOT / "data" / "tiny_instruct.jsonl"), tokenizer,
                                       max_seq_length=128)  # fmt: skip
        batches = [
            collate(examples[i * 8 : (i + 1) * 8], pad_token_id=tokenizer.pad_token_id) for i in range(8)
        ]
        total = sum(p.numel() for p in load(model_dir, None, torch.float32, "cpu").parameters())
        targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        selections = {}
        for kind in (None, *KINDS):
            model = load(model_dir, kind, torch.float32, "cpu")
            model.train()
            for percent in (1, 5):
                config = SMTConfig(block_size=16, target_modules=targets, warmup_steps=8,
                                   num_blocks=round(percent / 100 * total / 256))  # fmt: skip
                selection, _ = choose_blocks(model, iter(batches), config)
                selections[kind or "fp32", percent] = {
                    (module, *block) for module, index in selection.blocks.items() for block in index.tolist()
                }
        out[name] = {
            f"{kind} {percent}%": round(jaccard(selections["fp32", percent], selections[kind, percent]), 3)
            for kind in KINDS
            for percent in (1, 5)
        }
        print(f"{name}: Jaccard against the fp32 warm-up {out[name]}", flush=True)
    return out


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


# ---- accuracy: quality.py's study on the world model in 4 bits -----------------------------------


def accuracy(args) -> dict:
    from quality import Study
    from quality import parse_args as quality_args

    output = Path(args.json).with_name("quantized_quality.json")
    study_args = quality_args(["--methods", "lora,smt", "--tables", "3", "--ranks", "4", "--lrs", args.lr,
                               "--extend", "0", "--seeds", "0", "--threads", str(args.threads),
                               "--load_in_4bit", "--output", str(output), *(["--restart"] if args.restart else []),
                               *(["--steps", str(args.accuracy_steps), "--limit", str(args.limit)] if args.limit else [])])  # fmt: skip
    study = Study(study_args)
    study.run()
    runs = study.state["runs"]
    return {key: {"method": r["method"], "trainable": r["trainable"], "test": r["test"], "final_loss": r.get("final_loss")}
            for key, r in runs.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="119m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    parser.add_argument("--smt-warmup", type=int, default=2, help="SMT warm-up micro-batches")
    parser.add_argument("--percent", type=float, default=1.0, help="trainable share of all parameters")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--selection-models", default="tiny-llama,world-llama")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--lr", default="1e-2", help="the accuracy runs' learning rate (both methods)")
    parser.add_argument("--limit", type=int, default=0, help="accuracy: score only N records (a smoke run)")
    parser.add_argument("--accuracy-steps", type=int, default=150)
    parser.add_argument("--restart", action="store_true", help="accuracy: replace an earlier study's JSON")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quantized.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.methods = args.methods.split(",")
    args.selection_models = args.selection_models.split(",")
    start = time.perf_counter()
    report: dict = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "method", "model_dir")}
    }
    if not args.skip_speed:
        report["speed_and_memory"] = speed_and_memory(args)
        for method in args.methods:
            r = report["speed_and_memory"][method]
            print(f"{method:10s} trainable {r['trainable']:>9,d}  step {r['step_s']:.3f} s  "
                  f"build peak {r['build_peak_mib']:.0f} MiB  train peak {r['train_peak_mib']:.0f} MiB", flush=True)  # fmt: skip
        for key in ("smt_over_qlora", "nf4_over_fp32_smt"):
            if key in report["speed_and_memory"]:
                print(key, {k: round(v, 3) for k, v in report["speed_and_memory"][key].items()}, flush=True)
    if not args.skip_selection:
        report["selection_jaccard"] = selection_agreement(args)
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args)
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.json} ({report['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
