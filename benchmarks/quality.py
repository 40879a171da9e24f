#!/usr/bin/env python
"""Does it learn? Accuracy of full fine-tuning, LoRA, DoRA and SMT at several budgets (the paper's Table 3).

    python benchmarks/quality.py --lrs 3e-3,1e-2     # what docs/quality.md shows, ~20 minutes on 2 cores
    python benchmarks/quality.py --steps 2 --lrs 1e-3 --budgets 1 --limit 4 --output /tmp/q.json  # smoke

The shipped pretrained tiny Llama (``models/tiny-llama``) is fine-tuned on the shipped instruction
set (``data/tiny_instruct.jsonl``: the train splits of two generated tasks in LLM-Adapters'
layouts, ``tiny_facts`` like ARC and ``tiny_arith`` like GSM8K) and scored on their held-out test
splits with LLM-Adapters' answer rules (``smt_dist.recipes.evaluation``). Every method sees the same
examples in the same order for the same number of steps, in one process, fp32. LoRA and DoRA
(peft, ``lora_alpha = 2 r``) take ranks 1, 2, 4 and 8 on the same target modules as SMT; SMT takes
exactly as many trainable parameters as LoRA at each rank (blocks of 16 x 16; its warm-up of
``--warmup-steps`` micro-batches comes on top). Each method's learning rate is chosen from
``--lrs`` (full fine-tuning: those divided by 10) by mean accuracy on the validation splits; the
test accuracy of that choice is reported.

Writes ``benchmarks/results/quality.json`` (every run: method, rank or budget, trainable
parameters and %, learning rate, validation and test accuracy per task) and ``quality.png``
(mean test accuracy against trainable %).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smt_dist import SMTConfig, apply_smt, choose_blocks  # noqa: E402
from smt_dist.files.atomic import write_json  # noqa: E402
from smt_dist.recipes.data import collate, read_records, tokenize_records  # noqa: E402
from smt_dist.recipes.evaluation import extract_answer, generate_responses, is_correct, read_test_file  # noqa: E402

MODEL = REPO / "models" / "tiny-llama"
DATA = REPO / "data" / "tiny_instruct.jsonl"
EVAL = REPO / "data" / "tiny_eval"
TASKS = ("tiny_facts", "tiny_arith")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # LLM-Adapters' LoRA targets for LLaMA
BLOCK = 16


def load_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


def lora_parameters(model, rank: int) -> int:
    """Trainable parameters of LoRA at ``rank`` on TARGETS: ``r (in + out)`` per target."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    )


def training_batches(tokenizer, args) -> list[dict]:
    examples, _ = tokenize_records(read_records(DATA), tokenizer, max_seq_length=128)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    needed = args.steps * args.batch
    rows = [order[i % len(order)] for i in range(needed)]
    return [
        collate(
            [examples[i] for i in rows[s * args.batch : (s + 1) * args.batch]],
            pad_token_id=tokenizer.pad_token_id,
        )
        for s in range(args.steps)
    ]


def prepare(method: str, size: int, batches: list[dict], args):
    """The model to train and its trainable parameters, for one method at one rank/budget."""
    model = load_model()
    if method == "full":
        return model, list(model.parameters())
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=size,
            lora_alpha=2 * size,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            use_dora=method == "dora",
        )
        model = get_peft_model(model, config)
        return model, [p for p in model.parameters() if p.requires_grad]
    budget = lora_parameters(model, size) // BLOCK**2  # SMT matched to LoRA's count at this rank
    config = SMTConfig(
        block_size=BLOCK, target_modules=",".join(TARGETS), num_blocks=budget, warmup_steps=args.warmup_steps
    )
    selection, _ = choose_blocks(model, itertools.cycle(batches), config)
    apply_smt(model, selection, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def train(model, params, batches: list[dict], lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(batches)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup))
    )
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def accuracy(model, tokenizer, split: str, limit: int) -> dict[str, float]:
    out = {}
    for task in TASKS:
        records = read_test_file(EVAL / task / f"{split}.json", task)[: limit or None]
        responses = generate_responses(model, tokenizer, records, batch_size=25, max_new_tokens=24)
        correct = sum(
            is_correct(task, extract_answer(task, response), record["answer"])
            for record, response in zip(records, responses, strict=True)
        )
        out[task] = correct / len(records)
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=8, help="SMT's warm-up micro-batches.")
    parser.add_argument("--ranks", default="1,2,4,8", help="LoRA/DoRA ranks; SMT is matched to each.")
    parser.add_argument("--budgets", default=None, help="Use only the first N ranks (smoke runs).")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="Learning-rate grid (full: divided by 10).")
    parser.add_argument("--methods", default="full,lora,dora,smt")
    parser.add_argument("--limit", type=int, default=0, help="Score only the first N records per split.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    batches = training_batches(tokenizer, args)
    ranks = [int(r) for r in args.ranks.split(",")][: int(args.budgets) if args.budgets else None]
    lrs = [float(x) for x in args.lrs.split(",")]
    base = load_model()
    total = sum(p.numel() for p in base.parameters())
    runs = [{"method": "base", "rank": None, "trainable": 0, "percent": 0.0, "lr": None,
             "val": accuracy(base, tokenizer, "val", args.limit), "test": accuracy(base, tokenizer, "test", args.limit)}]  # fmt: skip
    print(f"base: test {runs[0]['test']}", flush=True)
    for method in args.methods.split(","):
        for size in [0] if method == "full" else ranks:
            best = None
            for lr in [x / 10 for x in lrs] if method == "full" else lrs:
                torch.manual_seed(0)
                start = time.perf_counter()
                model, params = prepare(method, size, batches, args)
                losses = train(model, params, batches, lr)
                trainable = sum(p.numel() for p in params)
                run = {
                    "method": method,
                    "rank": size or None,
                    "trainable": trainable,
                    "percent": 100 * trainable / total,
                    "lr": lr,
                    "final_loss": mean(losses[-10:]),
                    "val": accuracy(model, tokenizer, "val", args.limit),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                if not math.isfinite(run["final_loss"]):
                    run["val"] = {task: 0.0 for task in TASKS}
                print(f"{method} r={size} lr={lr:g}: loss {run['final_loss']:.3f} val {run['val']} "
                      f"({run['seconds']} s)", flush=True)  # fmt: skip
                if best is None or mean(run["val"].values()) > mean(best[0]["val"].values()):
                    best = (run, model)
            run, model = best
            run["test"] = accuracy(model, tokenizer, "test", args.limit)
            run["chosen"] = True
            print(f"  chosen lr {run['lr']:g}: test {run['test']}", flush=True)
            runs.append(run)
    result = {"steps": args.steps, "batch": args.batch, "total_parameters": total, "runs": runs}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, result)
    print_table(runs)
    plot(runs, output.with_suffix(".png"))


def print_table(runs: list[dict]) -> None:
    print("\n| method | rank | trainable % | lr | " + " | ".join(TASKS) + " | mean |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in TASKS) + " | --- |")
    for run in runs:
        cells = [f"{100 * run['test'][t]:.0f}" for t in TASKS]
        print(
            f"| {run['method']} | {run['rank'] or '-'} | {run['percent']:.2f} | {run['lr'] or '-'} | "
            + " | ".join(cells)
            + f" | {100 * mean(run['test'].values()):.1f} |"
        )


def plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, marker, label in (("smt", "o", "SMT"), ("lora", "s", "LoRA"), ("dora", "^", "DoRA")):
        points = sorted((r["percent"], 100 * mean(r["test"].values())) for r in runs if r["method"] == method)
        if points:
            axis.plot(*zip(*points, strict=True), marker=marker, label=label)
    for method, style in (("full", "--"), ("base", ":")):
        for run in (r for r in runs if r["method"] == method):
            axis.axhline(100 * mean(run["test"].values()), linestyle=style, color="grey", label=method)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (% of the model)")
    axis.set_ylabel("mean test accuracy (%)")
    axis.set_title("tiny Llama, tiny_facts + tiny_arith")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
