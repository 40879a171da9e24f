"""Accuracy of a model (a base plus an SMT adapter, or a merged checkpoint) on LLM-Adapters test sets.

    python launch/eval.py --model_name_or_path models/tiny-llama --adapter runs/smt/adapter \\
        --data_dir data/tiny_eval --output_dir runs/smt/eval
    torchrun --nproc_per_node 2 launch/eval.py --model_name_or_path runs/smt/merged --test_file gsm8k=test.json
    python -m smt_dist.recipes.evaluate ...          # the same job from an installed package

Each test file is a JSON list of LLM-Adapters records (``instruction``, optional ``input``,
``answer``); its dataset name (the folder name under ``--data_dir``, or ``NAME=`` before a
``--test_file``) picks LLM-Adapters' rule for reading the answer out of a response
(``smt_dist.recipes.evaluation``). Generation is greedy and batched. Under torchrun or deepspeed every rank
answers a slice of each file and rank 0 writes, per dataset, ``<name>_predictions.jsonl`` and, for
all of them, ``accuracy.json``. Bad input is one sentence and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from smt_dist.distributed import rank as global_rank
from smt_dist.distributed import world_size
from smt_dist.distributed.launch import init_process_group, leave_process_group
from smt_dist.files.adapter import load_smt_adapter
from smt_dist.files.atomic import write_json, write_jsonl
from smt_dist.files.model_dir import check_vocabulary, check_weights, empty_model
from smt_dist.recipes.data import load_tokenizer
from smt_dist.recipes.evaluation import (
    extract_answer,
    generate_responses,
    is_correct,
    read_test_file,
    rule_of,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A base or merged model directory.")
    parser.add_argument("--adapter", default=None, help="An SMT adapter trained on that base.")
    parser.add_argument("--data_dir", default=None, help="A folder of <dataset>/test.json files.")
    parser.add_argument(
        "--test_file", action="append", default=[], help="NAME=PATH of one test file (repeatable)."
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument(
        "--limit", type=int, default=0, help="Evaluate only the first N records of each file."
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--disable_tqdm", action="store_true")
    args = parser.parse_args(argv)
    rank = global_rank()
    try:
        files = test_files(args)
        accuracy = evaluate(args, files, rank=rank)
    except (ValueError, OSError) as err:
        if rank == 0:
            print(f"eval.py: error: {err}", file=sys.stderr)
        leave_process_group(together=False)  # a peer may be in a collective this rank never reaches
        return 1
    leave_process_group()
    if rank == 0:
        for name, result in accuracy.items():
            print(f"{name}: {result['accuracy']:.4f} ({result['correct']}/{result['total']})")
    return 0


def test_files(args: argparse.Namespace) -> dict[str, Path]:
    """Dataset name to test file, from ``--data_dir`` and ``--test_file``, checked before loading."""
    files: dict[str, Path] = {}
    if args.data_dir:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data_dir {root} is not a directory.")
        files.update({p.parent.name: p for p in sorted(root.glob("*/test.json"))})
        if not files:
            raise ValueError(f"--data_dir {root} holds no <dataset>/test.json files.")
    for spec in args.test_file:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--test_file takes NAME=PATH, got {spec!r}.")
        files[name] = Path(path)
    if not files:
        raise ValueError("Give --data_dir or at least one --test_file.")
    return files


def evaluate(args: argparse.Namespace, files: dict[str, Path], *, rank: int) -> dict[str, dict]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    # Read (and each task's answer rule known) before the model loads: bad input costs nothing.
    records = {name: read_test_file(path, name) for name, path in files.items()}
    for name in records:
        rule_of(name)
    if args.limit > 0:
        records = {name: rows[: args.limit] for name, rows in records.items()}
    model_dir = Path(args.model_name_or_path)
    meta_model = empty_model(model_dir)
    check_weights(model_dir, meta_model)  # safetensors only, every weight with the config's shape
    tokenizer = load_tokenizer(model_dir)
    check_vocabulary(model_dir, tokenizer, meta_model)
    del meta_model
    world = _init_distributed()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32, use_safetensors=True
    )
    if args.adapter:
        load_smt_adapter(model, args.adapter)
    model.to(device)
    accuracy, predictions = {}, {}
    for name, rows in records.items():
        mine = list(range(rank, len(rows), world))
        progress = tqdm(total=len(mine), desc=name, disable=args.disable_tqdm or rank != 0)
        answered = []
        responses = generate_responses(
            model,
            tokenizer,
            [rows[i] for i in mine],
            batch_size=args.per_device_eval_batch_size,
            max_new_tokens=args.max_new_tokens,
            device=device,
        )
        for index, response in zip(mine, responses, strict=True):
            prediction = extract_answer(name, response)
            answered.append(
                {
                    "index": index,
                    **rows[index],
                    "output_pred": response,
                    "pred": prediction if prediction != float("inf") else None,
                    "flag": is_correct(name, prediction, rows[index]["answer"]),
                }
            )
            progress.update(1)
        progress.close()
        everyone = _gather(answered, world)
        everyone.sort(key=lambda row: row["index"])
        correct = sum(row["flag"] for row in everyone)
        accuracy[name] = {"accuracy": correct / len(everyone), "correct": correct, "total": len(everyone)}
        predictions[name] = everyone
    if rank == 0:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        for name, rows in predictions.items():
            write_jsonl(output / f"{name}_predictions.jsonl", rows)
        write_json(output / "accuracy.json", accuracy)
    return accuracy


def _init_distributed() -> int:
    """Join the launcher's process group when there is one; returns the world size."""
    if world_size() <= 1:
        return 1
    import torch.distributed as dist

    if not dist.is_initialized():
        init_process_group()
    return dist.get_world_size()


def _gather(rows: list[dict], world: int) -> list[dict]:
    if world == 1:
        return rows
    import torch.distributed as dist

    everyone: list[list[dict] | None] = [None] * world
    dist.all_gather_object(everyone, rows)
    return [row for part in everyone for row in part]


if __name__ == "__main__":
    sys.exit(main())
