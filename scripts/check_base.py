#!/usr/bin/env python
"""Does a base model fine-tune like a real LLM? The checks a model for the accuracy study must pass.

    python scripts/check_base.py                                   # models/world-llama, ~10 minutes
    python scripts/check_base.py --model models/tiny-llama --skip_full   # the fast-test model, for contrast

On the shipped tasks (``data/tiny_eval``, and the train splits in ``data/tiny_instruct.jsonl``):

1. **response loss**: mean negative log-likelihood per response token of each task's train split
   under the base, in the job's Alpaca layout. A real LLM starts instruction tuning at 1-3 nats;
   the target is 1.5-4 (above it the model is confidently wrong, below it there is nothing left
   to learn);
2. **fact probe**: every fact of the world asked as a plain completion in the pretraining
   text's words ("The camel lives in the" -> "desert"), greedy; the target is at least 80% right,
   so the model knows what the tasks ask and fine-tuning teaches their layout;
   and, as a diagnostic, the **question probe**: the same facts asked as chat turns ("User: Where
   does the camel live?"); a model that only completes statements fails it, and then fine-tuning
   has no knowledge it can reach through a question;
3. **full fine-tuning**: ``benchmarks/quality.py``'s training (150 steps of 16, seed 0) at three
   learning rates, the best on the validation splits scored on the test splits; the target is at
   least 60% mean test accuracy where the base is at most 10%;
4. **warm-up profile**: SMT's warm-up (8 micro-batches, ``mean_abs``, 16 x 16 blocks on q, k, v,
   up, down) as mean block score per layer and module type, and the ratio of the largest layer's
   mean to the median layer's per type (the first model's layer 0 stood 10-20x above the rest).

Prints a table and writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402
from make_tiny_assets import task_splits  # noqa: E402
from tiny_world import ATTRIBUTES, QUESTIONS, make_world, pointing_question  # noqa: E402

from smt_dist import SMTConfig, collect_block_scores  # noqa: E402
from smt_dist.files.atomic import write_json  # noqa: E402
from smt_dist.recipes.data import collate, tokenize_records  # noqa: E402

PROBES = {  # each phrasing stands in the world corpus; the answer is the next word
    "home": "The {n} lives in the",
    "color": "The color of the {n} is",
    "kind": "A {n} is a kind of",
    "size": "Compared with a mouse, the {n} is",
}
TARGETS = {"response_loss": (1.5, 4.0), "fact_probe": 0.8, "full_fine_tuning": 0.6, "base": 0.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "world-llama"))
    parser.add_argument("--full_lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--skip_full", action="store_true", help="Leave out the full fine-tuning check.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="Default: <model>/base_checks.json.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    study = quality.Study(quality.parse_args(["--model", args.model, "--output", "/dev/null/unused.json"]))
    model = study.load_model()
    losses, least_likely = response_loss(model, study.tokenizer)
    report = {
        "model": str(Path(args.model).relative_to(REPO))
        if Path(args.model).is_relative_to(REPO)
        else args.model,
        "response_loss": losses,
        "least_likely_response_tokens": least_likely,
        "fact_probe": fact_probe(model, study.tokenizer),
        "question_probe": question_probe(model, study.tokenizer),
        "pointing_probe": pointing_probe(model, study.tokenizer),
        "base_accuracy": study.accuracy(model, "test"),
        "warmup_profile": warmup_profile(model, study),
    }
    if not args.skip_full:
        report["full_fine_tuning"] = full_fine_tuning(study, [float(x) for x in args.full_lrs.split(",")])
    report["verdicts"] = verdicts(report)
    output = Path(args.output or Path(args.model) / "base_checks.json")
    write_json(output, report)
    print_report(report)
    print(f"wrote {output}")


def response_loss(model, tokenizer) -> tuple[dict[str, float], dict[str, list]]:
    """Nats per response token of each task's train split, weighted by tokens; and per task the
    response tokens the base finds least likely (mean nats), where a high loss comes from."""
    out, worst = {}, {}
    for task, splits in task_splits().items():
        examples, _ = tokenize_records(splits["train"], tokenizer, max_seq_length=128)
        total, tokens = 0.0, 0
        per_token: dict[str, list[float]] = {}
        with torch.no_grad():
            for first in range(0, len(examples), 32):
                batch = collate(examples[first : first + 32], pad_token_id=tokenizer.pad_token_id)
                labels = batch["labels"][:, 1:]
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
                )
                kept = labels != -100
                total += nll[kept].sum().item()
                tokens += int(kept.sum())
                for token, value in zip(labels[kept].tolist(), nll[kept].tolist(), strict=True):
                    per_token.setdefault(tokenizer.decode([token]), []).append(value)
        out[task] = total / tokens
        means = {token: sum(v) / len(v) for token, v in per_token.items()}
        worst[task] = [
            [token, round(value, 2)] for token, value in sorted(means.items(), key=lambda kv: -kv[1])[:6]
        ]
    return out, worst


def fact_probe(model, tokenizer) -> dict[str, float]:
    """Share of the world's facts the base completes right, per attribute and overall."""
    world = make_world(0)
    tokenizer.padding_side = "left"
    right: dict[str, list[bool]] = {attribute: [] for attribute in ATTRIBUTES}
    model.eval()
    for attribute in ATTRIBUTES:
        prompts = [PROBES[attribute].format(n=thing.name) for thing in world]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=3, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for thing, text in zip(world, texts, strict=True):
            words = text.replace(".", " ").split()
            right[attribute].append(bool(words) and words[0] == getattr(thing, attribute))
    shares = {attribute: sum(flags) / len(flags) for attribute, flags in right.items()}
    shares["all"] = sum(sum(flags) for flags in right.values()) / sum(len(flags) for flags in right.values())
    return shares


def question_probe(model, tokenizer) -> dict[str, float]:
    """Share of the world's facts the base answers right when asked, as a chat turn in its own text.

    "User: Where does the camel live?\nAssistant:" -> an answer naming the right value and no other
    value of that attribute. A model that only completes statements answers every question about
    one attribute with the same canned entity and value, and scores near one over the values.
    """
    world = make_world(0)
    tokenizer.padding_side = "left"
    right: dict[str, list[bool]] = {attribute: [] for attribute in ATTRIBUTES}
    model.eval()
    for attribute in ATTRIBUTES:
        values = {getattr(thing, attribute) for thing in world}
        asks = [
            QUESTIONS[attribute][i % len(QUESTIONS[attribute])].format(n=t.name) for i, t in enumerate(world)
        ]
        encoded = tokenizer([f"User: {ask}\nAssistant:" for ask in asks], return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=12, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for thing, text in zip(world, texts, strict=True):
            said = set(text.split("\n")[0].lower().replace(".", " ").replace(",", " ").split()) & values
            right[attribute].append(said == {getattr(thing, attribute)})
    shares = {attribute: sum(flags) / len(flags) for attribute, flags in right.items()}
    shares["all"] = sum(sum(flags) for flags in right.values()) / sum(len(flags) for flags in right.values())
    return shares


def pointing_probe(model, tokenizer) -> dict[str, float]:
    """Share of four-option questions on which the base points at the right option (diagnostic).

    Every fact of the world as a ``pointing_question`` of each kind. The next token is scored
    among "1".."4"; chance is 25%. A base at chance here cannot name the option that holds what
    it knows, and 150 steps of fine-tuning did not teach it that (docs/quality.md)."""
    world = make_world(0)
    rng = random.Random(123)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 5)]
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out = {}
    for kind in ("lookup", "knowledge"):
        asked = [pointing_question(t, a, kind, rng) for t in world for a in ATTRIBUTES]
        hits = 0
        for first in range(0, len(asked), 64):
            prompts, answers = zip(*asked[first : first + 64], strict=True)
            encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = model(**encoded).logits[:, -1, digits]
            hits += sum(int(a == b) for a, b in zip(logits.argmax(-1).tolist(), answers, strict=True))
        out[kind] = hits / len(asked)
    model.train(was_training)
    return out


def full_fine_tuning(study, lrs: list[float]) -> dict:
    """Full fine-tuning at each rate (seed 0); the best on validation, scored on test."""
    runs = []
    for lr in lrs:
        torch.manual_seed(0)
        batches = study.batches(0)
        model, params, _ = study.prepare("full", 0, batches, 0)
        losses = quality.train(model, params, batches, lr)
        runs.append({"lr": lr, "final_loss": quality._mean(losses[-10:]),
                     "val": study.accuracy(model, "val"), "test": study.accuracy(model, "test")})  # fmt: skip
        print(
            f"full lr {lr:g}: loss {runs[-1]['final_loss']:.3f} val {runs[-1]['val']} test {runs[-1]['test']}"
        )
    best = max(runs, key=lambda r: quality._mean(r["val"].values()))
    return {
        "runs": runs,
        "chosen_lr": best["lr"],
        "test": best["test"],
        "mean": quality._mean(best["test"].values()),
    }


def warmup_profile(model, study) -> dict:
    """Mean block score per layer and module type, and largest-to-median layer ratios."""
    config = SMTConfig(block_size=quality.BLOCK, target_modules=",".join(quality.TARGETS), num_blocks=1,
                       warmup_steps=8)  # fmt: skip
    scores = collect_block_scores(model, itertools.cycle(study.batches(0)), config)
    table: dict[str, dict[str, float]] = {}
    for name, grid in scores.items():
        parts = name.split(".")
        layer = next(p for p in parts if p.isdigit())
        table.setdefault(parts[-1], {})[layer] = grid.mean().item()
    ratios = {kind: max(by.values()) / statistics.median(by.values()) for kind, by in table.items()}
    layers = sorted({layer for by in table.values() for layer in by}, key=int)
    overall = {layer: statistics.mean(table[kind][layer] for kind in table) for layer in layers}
    return {"mean_score": table, "max_over_median": ratios,
            "max_over_median_all": max(overall.values()) / statistics.median(overall.values())}  # fmt: skip


def verdicts(report: dict) -> dict[str, bool]:
    low, high = TARGETS["response_loss"]
    out = {
        "response_loss": all(low <= v <= high for v in report["response_loss"].values()),
        "fact_probe": report["fact_probe"]["all"] >= TARGETS["fact_probe"],
        "base_accuracy": quality._mean(report["base_accuracy"].values()) <= TARGETS["base"],
    }
    if "full_fine_tuning" in report:
        out["full_fine_tuning"] = report["full_fine_tuning"]["mean"] >= TARGETS["full_fine_tuning"]
    return out


def print_report(report: dict) -> None:
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    v = report["verdicts"]
    print(f"\n## {report['model']}\n")
    print("| check | target | measured | |")
    print("| --- | --- | --- | --- |")
    losses = ", ".join(f"{t} {x:.2f}" for t, x in report["response_loss"].items())
    print(f"| response loss (nats/token, train splits) | 1.5-4 | {losses} | {mark(v['response_loss'])} |")
    probe = report["fact_probe"]
    detail = ", ".join(f"{a} {100 * probe[a]:.0f}%" for a in ATTRIBUTES)
    print(
        f"| fact probe (plain completions) | >= 80% | {100 * probe['all']:.0f}% ({detail}) | {mark(v['fact_probe'])} |"
    )
    asked = report["question_probe"]
    detail = ", ".join(f"{a} {100 * asked[a]:.0f}%" for a in ATTRIBUTES)
    print(f"| question probe (chat turns, diagnostic) | - | {100 * asked['all']:.0f}% ({detail}) | |")
    point = report.get("pointing_probe")
    if point:
        print(f"| pointing probe (four options, diagnostic) | - | look-up {100 * point['lookup']:.0f}%, "
              f"knowledge {100 * point['knowledge']:.0f}% (chance 25%) | |")  # fmt: skip
    base = report["base_accuracy"]
    base_text = ", ".join(f"{t} {100 * x:.0f}%" for t, x in base.items())
    print(f"| base test accuracy | <= 10% mean | {base_text} | {mark(v['base_accuracy'])} |")
    if "full_fine_tuning" in report:
        full = report["full_fine_tuning"]
        text = ", ".join(f"{t} {100 * x:.0f}%" for t, x in full["test"].items())
        print(f"| full fine-tuning test accuracy (lr {full['chosen_lr']:g}) | >= 60% mean | {text} "
              f"(mean {100 * full['mean']:.1f}%) | {mark(v['full_fine_tuning'])} |")  # fmt: skip
    for task, tokens in report["least_likely_response_tokens"].items():
        print(f"least likely response tokens of {task}: " + ", ".join(f"{t!r} {v}" for t, v in tokens))
    profile = report["warmup_profile"]
    print("\nwarm-up mean block score per layer (largest / median layer):")
    for kind, by in profile["mean_score"].items():
        cells = " ".join(f"{by[layer]:.2e}" for layer in sorted(by, key=int))
        print(f"  {kind:10s} {cells}   ({profile['max_over_median'][kind]:.1f}x)")
    print(f"  all types: {profile['max_over_median_all']:.1f}x")


if __name__ == "__main__":
    main()
