#!/usr/bin/env python
"""Does SMT beat LoRA? The paper's Tables 3 and 6 with seeds, learning-rate grids and a random control.

    python benchmarks/quality.py                       # the whole study on models/world-llama (docs/quality.md)
    python benchmarks/quality.py --tables 3 --ranks 1,4 --seeds 0   # part of it
    python benchmarks/quality.py --steps 2 --lrs 1e-3 --ranks 1 --seeds 0 --limit 2 --output /tmp/q.json  # smoke

A base model (default ``models/world-llama``) is fine-tuned on an instruction set in the Alpaca
layout (default ``data/tiny_instruct.jsonl``) and scored on every task under ``--eval_dir``
(``<task>/val.json`` and ``<task>/test.json`` in LLM-Adapters' layout; a new task folder joins the
study as it is, its answer rule read from its layout) with LLM-Adapters' answer rules. Every run
sees the same number of steps of the same batch size, in one process, fp32; a seed fixes the
example order, the warm-up's batches (its first micro-batches), LoRA's initialisation and the
random control's blocks.

The methods (``--methods``):

- ``full`` fine-tuning; ``lora`` and ``dora`` (peft, ``lora_alpha = 2 r``) at ranks ``--ranks``
  on ``TARGETS`` (LLM-Adapters' LoRA targets for LLaMA);
- ``smt``: the paper's default selection (warm-up, global top-k over the same targets, 16 x 16
  blocks), matched to LoRA's trainable count at each rank;
- ``random``: the same number of blocks on the same targets chosen uniformly at random (seeded),
  the control any selection has to beat (SHiRA's idea at block granularity);
- Table 6 (``--tables 6``): the whole budget of ``--table6_percent`` of the model's parameters on
  ``q_proj`` only, ``k_proj`` only, ``v_proj`` only, or selected automatically over q, k and v.

Each method's learning rate comes from ``--lrs`` (full fine-tuning: the grid divided by 10) at the
LoRA rank ``--lr_rank``, seed 0, by mean validation accuracy; a best rate at the edge of the grid
extends it by one 3x step that way (up to ``--extend`` times). The Table 6 variants are SMT and
use its rate. Every budget then runs at its method's rate with each of ``--seeds``.

Every finished run goes into ``--output`` (JSON, written atomically after each run), so an
interrupted study resumes where it stopped with the same command; a different setting starts a
new file only with ``--restart``. At the end the file gets a ``summary``: mean and standard
deviation of test accuracy per method and budget, and which differences exceed the spread; and a
plot (``.png`` beside it) of mean test accuracy against trainable %, with the spread as bars.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from smt_dist import BlockSelection, SMTConfig, apply_smt, choose_blocks, find_targets
from smt_dist.core.blocks import block_grid, weight_shape
from smt_dist.core.quantized import keep_layout
from smt_dist.core.surgery import count_parameters
from smt_dist.files.atomic import write_json
from smt_dist.files.jsonfile import read_json
from smt_dist.recipes.data import collate, load_tokenizer, read_records, tokenize_records
from smt_dist.recipes.evaluation import extract_answer, generate_responses, is_correct, read_test_file

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # LLM-Adapters' LoRA targets for LLaMA
TABLE6 = {"smt_q": "q_proj", "smt_k": "k_proj", "smt_v": "v_proj", "smt_qkv": "q_proj,k_proj,v_proj"}
BLOCK = 16
SETTINGS = ("model", "data", "eval_dir", "steps", "batch", "warmup_steps", "limit", "block", "load_in_4bit")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    study = Study(args)
    study.run()
    study.report()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "world-llama"))
    parser.add_argument("--data", default=str(REPO / "data" / "tiny_instruct.jsonl"))
    parser.add_argument("--eval_dir", default=str(REPO / "data" / "tiny_eval"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup_steps", type=int, default=8, help="SMT's warm-up micro-batches.")
    parser.add_argument("--methods", default="full,lora,dora,smt,random")
    parser.add_argument("--tables", default="3,6", help="3: the budgets; 6: q / k / v / auto at one budget.")
    parser.add_argument("--ranks", default="1,2,4,8,12", help="LoRA/DoRA ranks; SMT and random match each.")
    parser.add_argument(
        "--lr_rank", type=int, default=4, help="The rank at which each method's rate is chosen."
    )
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2", help="The grid (full: divided by 10).")
    parser.add_argument("--extend", type=int, default=2, help="Extend the grid this often at most.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--table6_percent", type=float, default=0.86)
    parser.add_argument("--limit", type=int, default=0, help="Score only the first N records per split.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--load_in_4bit", action="store_true", help="The base in NF4 (bitsandbytes), as QLoRA loads it."
    )
    parser.add_argument("--restart", action="store_true", help="Start a new file when settings differ.")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    args = parser.parse_args(argv)
    args.block = BLOCK
    return args


class Study:
    """The runs of one study, kept in its JSON file as they finish."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.output = Path(args.output)
        self.settings = {key: getattr(args, key) for key in SETTINGS}
        self.state = self._load_state()
        self.tasks = sorted(p.parent.name for p in Path(args.eval_dir).glob("*/test.json"))
        if not self.tasks:
            raise SystemExit(f"quality.py: error: {args.eval_dir} holds no <task>/test.json.")
        self.tokenizer = load_tokenizer(Path(args.model))
        self.examples, _ = tokenize_records(read_records(args.data), self.tokenizer, max_seq_length=128)
        self.records = {
            (task, split): read_test_file(Path(args.eval_dir) / task / f"{split}.json", task)[
                : args.limit or None
            ]
            for task in self.tasks
            for split in ("val", "test")
        }
        self.total = count_parameters(self.load_model())  # 4-bit weights at their full size
        self.chosen_lr: dict[str, float] = {}

    def _load_state(self) -> dict:
        if self.output.is_file():
            state = read_json(self.output, what="Quality study")
            if state.get("settings") == self.settings:
                print(f"resuming {self.output}: {len(state['runs'])} runs done", flush=True)
                return state
            if not self.args.restart:
                raise SystemExit(
                    f"quality.py: error: {self.output} holds a study with other settings; pass --restart "
                    "to replace it or --output to keep both."
                )
        return {"settings": self.settings, "runs": {}}

    # ---- the plan -----------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        methods = args.methods.split(",")
        ranks = [int(r) for r in args.ranks.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        tables = args.tables.split(",")
        self.base()
        for method in methods:
            self.chosen_lr[method] = self.choose_lr(method, 0 if method == "full" else args.lr_rank)
        if "3" in tables:
            for method in methods:
                for size in [0] if method == "full" else ranks:
                    for seed in seeds:
                        self.one(method, size, self.chosen_lr[method], seed)
        if "6" in tables and "smt" in self.chosen_lr:
            for variant in TABLE6:
                for seed in seeds:
                    self.one(variant, 0, self.chosen_lr["smt"], seed)
        self.state["chosen_lr"] = self.chosen_lr
        self.save()

    def choose_lr(self, method: str, size: int) -> float:
        """The grid point with the best mean validation accuracy, the grid extended at an edge."""
        scale = 0.1 if method == "full" else 1.0
        grid = sorted(float(x) * scale for x in self.args.lrs.split(","))
        for extension in range(self.args.extend + 1):
            scores = {lr: _mean(self.one(method, size, lr, 0)["val"].values()) for lr in grid}
            best = max(grid, key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
            if extension == self.args.extend:
                break
            if best == grid[-1]:
                grid.append(grid[-1] * 3)
            elif best == grid[0] and len(grid) > 1:
                grid.insert(0, grid[0] / 3)
            else:
                break
        self.state.setdefault("grids", {})[method] = grid
        print(f"{method}: chosen lr {best:g} from {', '.join(f'{x:g}' for x in grid)}", flush=True)
        return best

    # ---- one run ----------------------------------------------------------------------------

    def base(self) -> None:
        if "base" not in self.state["runs"]:
            model = self.load_model()
            self.state["runs"]["base"] = {"method": "base", "size": 0, "trainable": 0, "percent": 0.0,
                                          **{s: self.accuracy(model, s) for s in ("val", "test")}}  # fmt: skip
            self.save()
        print(f"base: test {self.state['runs']['base']['test']}", flush=True)

    def one(self, method: str, size: int, lr: float, seed: int) -> dict:
        key = f"{method}|{size}|{lr:.3g}|{seed}"
        if key in self.state["runs"]:
            return self.state["runs"][key]
        torch.manual_seed(seed)
        start = time.perf_counter()
        batches = self.batches(seed)
        model, params, selection = self.prepare(method, size, batches, seed)
        losses = train(model, params, batches, lr)
        trainable = sum(p.numel() for p in params)
        run = {
            "method": method,
            "size": size,
            "lr": lr,
            "seed": seed,
            "trainable": trainable,
            "percent": 100 * trainable / self.total,
            "final_loss": _mean(losses[-10:]),
        }
        if selection is not None:
            run["selection"] = selection
        if math.isfinite(run["final_loss"]):
            run["val"], run["test"] = self.accuracy(model, "val"), self.accuracy(model, "test")
        else:  # diverged: it scores nothing
            run["val"] = run["test"] = {task: 0.0 for task in self.tasks}
        run["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{key}: loss {run['final_loss']:.3f} val {_fmt(run['val'])} test {_fmt(run['test'])} "
              f"({run['seconds']} s)", flush=True)  # fmt: skip
        self.state["runs"][key] = run
        self.save()
        return run

    def load_model(self):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if not self.args.load_in_4bit:
            return AutoModelForCausalLM.from_pretrained(self.args.model, dtype=torch.float32)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(
            self.args.model, dtype=torch.float32, device_map={"": "cpu"}, quantization_config=quantization
        )
        keep_layout(model)  # generation runs in eval mode: every method keeps the same base
        return model

    def batches(self, seed: int) -> list[dict]:
        """``--steps`` micro-batches of ``--batch`` examples, in the seed's order."""
        args = self.args
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = [order[i % len(order)] for i in range(args.steps * args.batch)]
        return [
            collate([self.examples[i] for i in rows[s * args.batch : (s + 1) * args.batch]],
                    pad_token_id=self.tokenizer.pad_token_id)
            for s in range(args.steps)
        ]  # fmt: skip

    def prepare(self, method: str, size: int, batches: list[dict], seed: int):
        """The model to train, its trainable parameters and (SMT and random) its selection's summary."""
        model = self.load_model()
        if method == "full":
            return model, list(model.parameters()), None
        if method in ("lora", "dora"):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=size, lora_alpha=2 * size, lora_dropout=0.0, target_modules=list(TARGETS),
                                use_dora=method == "dora")  # fmt: skip
            model = get_peft_model(model, config)
            return model, [p for p in model.parameters() if p.requires_grad], None
        if method in TABLE6:
            targets = TABLE6[method]
            budget = round(self.args.table6_percent / 100 * self.total / BLOCK**2)
        else:
            targets = ",".join(TARGETS)
            budget = lora_parameters(model, size) // BLOCK**2  # LoRA's trainable count at this rank
        config = SMTConfig(block_size=BLOCK, target_modules=targets, num_blocks=budget,
                           warmup_steps=self.args.warmup_steps)  # fmt: skip
        if method == "random":
            selection = random_blocks(model, config, budget, seed=seed)
        else:
            selection, _ = choose_blocks(model, itertools.cycle(batches), config)
        apply_smt(model, selection, config)
        return model, [p for p in model.parameters() if p.requires_grad], selection.summary(config)

    def accuracy(self, model, split: str) -> dict[str, float]:
        out = {}
        for task in self.tasks:
            records = self.records[task, split]
            responses = generate_responses(model, self.tokenizer, records, batch_size=25, max_new_tokens=24)
            correct = sum(
                is_correct(task, extract_answer(task, response), record["answer"])
                for record, response in zip(records, responses, strict=True)
            )
            out[task] = correct / len(records)
        return out

    def save(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.output, self.state)

    # ---- the report ---------------------------------------------------------------------------

    def report(self) -> None:
        summary = summarize(self.state["runs"], self.chosen_lr)
        self.state["summary"] = summary
        self.save()
        print_tables(summary, self.tasks)
        plot(summary, self.output.with_suffix(".png"))


def lora_parameters(model, rank: int) -> int:
    """Trainable parameters of LoRA at ``rank`` on TARGETS: ``r (in + out)`` per target."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    )


def random_blocks(model, config: SMTConfig, budget: int, *, seed: int) -> BlockSelection:
    """``budget`` blocks drawn uniformly from every block of every target, without replacement."""
    grid = []
    for name, linear in sorted(find_targets(model, config).items()):
        rows, cols = block_grid(weight_shape(linear.weight), config.block_size, name=name)
        grid += [(name, r, c) for r in range(rows) for c in range(cols)]
    picked = torch.randperm(len(grid), generator=torch.Generator().manual_seed(1000 + seed))[:budget]
    blocks: dict[str, list[list[int]]] = {}
    for i in sorted(picked.tolist()):
        name, r, c = grid[i]
        blocks.setdefault(name, []).append([r, c])
    return BlockSelection(
        block_size=config.block_size, blocks={n: torch.tensor(b) for n, b in blocks.items()}
    )


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


def summarize(runs: dict[str, dict], chosen_lr: dict[str, float]) -> dict:
    """Per method and budget: the seeds' mean and standard deviation of mean test accuracy (%),
    at the method's chosen rate (the Table 6 variants: SMT's)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for key, run in runs.items():
        if key == "base":
            continue
        groups.setdefault((run["method"], run["size"]), []).append(run)
    rows = []
    for (method, size), members in sorted(groups.items()):
        lr = chosen_lr.get("smt" if method in TABLE6 else method)
        seeded = [r for r in members if r["lr"] == lr]
        if not seeded:
            continue
        means = [100 * _mean(r["test"].values()) for r in seeded]
        tasks = {t: _mean(100 * r["test"][t] for r in seeded) for t in seeded[0]["test"]}
        row = {"method": method, "size": size, "lr": lr, "seeds": len(seeded), "percent": seeded[0]["percent"],
               "mean": _mean(means), "std": statistics.stdev(means) if len(means) > 1 else 0.0, "tasks": tasks,
               "final_loss": _mean(r["final_loss"] for r in seeded)}  # fmt: skip
        shares = [r["selection"]["by_type"] for r in seeded if "selection" in r]
        if shares:
            total = sum(shares[0].values())
            row["v_share"] = _mean(s.get("v_proj", 0) / sum(s.values()) for s in shares) if total else 0.0
        rows.append(row)
    base = runs.get("base")
    return {
        "base": 100 * _mean(base["test"].values()) if base else None,
        "rows": rows,
        "versus_lora": _versus(rows, "lora"),
        "versus_random": _versus(rows, "random"),
    }


def _versus(rows: list[dict], other: str) -> list[dict]:
    """SMT against ``other`` at each budget: the difference, and whether it exceeds the spread.

    "Exceeds the spread" means the means differ by more than the two standard deviations added,
    a plain rule for three seeds (no test of significance is claimed).
    """
    by = {(r["method"], r["size"]): r for r in rows}
    out = []
    for (method, size), row in sorted(by.items()):
        if method != "smt" or (other, size) not in by:
            continue
        them = by[other, size]
        difference = row["mean"] - them["mean"]
        out.append({"size": size, "smt": row["mean"], other: them["mean"], "difference": difference,
                    "exceeds_spread": abs(difference) > row["std"] + them["std"]})  # fmt: skip
    return out


def print_tables(summary: dict, tasks: list[str]) -> None:
    print(f"\nbase: {summary['base']:.1f}")
    print("| method | size | trainable % | lr | seeds | " + " | ".join(tasks) + " | mean +- std |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- |")
    for row in summary["rows"]:
        cells = " | ".join(f"{row['tasks'][t]:.1f}" for t in tasks)
        print(f"| {row['method']} | {row['size'] or '-'} | {row['percent']:.2f} | {row['lr']:g} | "
              f"{row['seeds']} | {cells} | {row['mean']:.1f} +- {row['std']:.1f} |")  # fmt: skip
    for other in ("lora", "random"):
        for line in summary[f"versus_{other}"]:
            verdict = "exceeds the spread" if line["exceeds_spread"] else "within the spread"
            print(f"SMT - {other} at r={line['size']}: {line['difference']:+.1f} ({verdict})")


def plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    styles = (
        ("smt", "o", "SMT"),
        ("random", "x", "random blocks"),
        ("lora", "s", "LoRA"),
        ("dora", "^", "DoRA"),
    )
    for method, marker, label in styles:
        rows = sorted((r for r in summary["rows"] if r["method"] == method), key=lambda r: r["percent"])
        if rows:
            axis.errorbar([r["percent"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                          marker=marker, capsize=3, label=label)  # fmt: skip
    for row in (r for r in summary["rows"] if r["method"] == "full"):
        axis.axhline(row["mean"], linestyle="--", color="grey", label="full fine-tuning")
    if summary["base"] is not None:
        axis.axhline(summary["base"], linestyle=":", color="grey", label="base")
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (% of the model)")
    axis.set_ylabel("mean test accuracy (%), mean +- std over seeds")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _fmt(accuracy: dict[str, float]) -> str:
    return " ".join(f"{task}={100 * value:.0f}" for task, value in accuracy.items())


if __name__ == "__main__":
    sys.exit(main())
