#!/usr/bin/env python
"""Fine-tune a causal LM with Sparse Matrix Tuning on DeepSpeed: warm-up, selection, training.

    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_smt.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed configs/zero2_smt.json
    mpirun -n 2 python launch/train.py --deepspeed configs/zero2_smt.json

With no --model_name_or_path/--data_path it trains the embedded tiny Llama (configs/tiny-llama)
on the embedded instruction set (data/tiny_instruct.jsonl). Phases, on every rank:
  1. warm-up: score every block over --smt_warmup_steps micro-batches (no optimizer; scores are
     summed across ranks);
  2. selection: global top-k, identical on every rank (checked), then SparseLinear swapped in;
  3. training over the blocks only, checkpoints every --save_steps, and at the end the adapter
     (and with --merge a merged Hugging Face checkpoint). With --deepspeed a DeepSpeed engine
     steps (ZeRO 0-3, offload); without it plain torch with BlockShardedAdamW, which shards the
     blocks' optimizer state and exchanges only their gradients (torchrun, mpirun).
Bad input stops the job with one sentence and exit code 1 before anything is written.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

from smt_dist import (  # noqa: E402
    apply_smt,
    collect_block_scores,
    count_parameters,
    find_targets,
    load_smt_adapter,
    merge_smt,
    save_smt_adapter,
    select_blocks,
)
from smt_dist.adapter import base_fingerprint  # noqa: E402
from smt_dist.distributed import check_same_selection  # noqa: E402
from smt_dist.distributed.launch import init_process_group  # noqa: E402
from smt_dist.io import atomic_directory, write_json  # noqa: E402
from smt_dist.model import selection_of  # noqa: E402
from smt_dist.selection import budget_in_blocks, check_budget_fits  # noqa: E402
from smt_dist.training.arguments import TrainArguments, parse_args  # noqa: E402
from smt_dist.training.backends import DeepSpeedBackend, FsdpBackend, TorchBackend  # noqa: E402
from smt_dist.training.checkpoint import (  # noqa: E402
    checkpoints,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from smt_dist.training.data import BatchOrder, collate, read_records, tokenize_records  # noqa: E402
from smt_dist.training.logs import JsonlLog, get_logger, rank_from_env, world_size_from_env  # noqa: E402

RUN_MARKERS = ("train_log.jsonl", "adapter", "selection.json")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        run = TrainingJob(args)
    except (ValueError, FileNotFoundError) as err:
        # Inputs are the same on every rank, so one rank saying it is enough.
        if rank_from_env() == 0:
            print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    try:
        run.train()
    except (ValueError, FileNotFoundError) as err:
        print(f"train.py: error (rank {rank_from_env()}): {err}", file=sys.stderr)
        return 1
    return 0


class TrainingJob:
    """One run: ``__init__`` checks every input before a process group exists, ``train`` runs it."""

    def __init__(self, args: TrainArguments) -> None:
        self.args = args
        self.smt_config = args.smt_config()
        self.output_dir = Path(args.output_dir)
        self.resume = (
            find_checkpoint(args.resume_from_checkpoint, self.output_dir)
            if args.resume_from_checkpoint
            else None
        )
        if not self.resume and not args.overwrite_output_dir and self.output_dir.is_dir():
            previous = [m for m in RUN_MARKERS if (self.output_dir / m).exists()] + checkpoints(
                self.output_dir
            )
            if previous:
                raise ValueError(
                    f"{self.output_dir} already holds a run; pass --overwrite_output_dir to replace it "
                    "or --resume_from_checkpoint to continue it."
                )
        self.ds = self.user_ds_config = None
        if args.deepspeed:
            from smt_dist import deepspeed as ds

            self.ds = ds
            self.user_ds_config = ds.read_config(args.deepspeed)
            # Checked now, with the world size the launcher announced, so a bad config writes nothing.
            self.resolve_ds_config(self.user_ds_config, world_size_from_env())
        self.tokenizer = load_tokenizer(args.model_dir)
        records = read_records(args.data_file)
        self.examples, self.dropped = tokenize_records(
            records, self.tokenizer, max_seq_length=args.max_seq_length
        )
        self.model = build_model(args)
        targets = find_targets(self.model, self.smt_config)  # checks block size against every target
        total_blocks = sum(t.weight.numel() for t in targets.values()) // self.smt_config.block_size**2
        budget = budget_in_blocks(self.smt_config, total_params=count_parameters(self.model))
        check_budget_fits(budget, available=total_blocks, modules=len(targets))

    def resolve_ds_config(self, config: dict, world_size: int) -> dict:
        """The DeepSpeed config for this run; raises ``ValueError`` when it contradicts the arguments."""
        args = self.args
        return self.ds.resolve_config(
            config,
            micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            world_size=world_size,
            max_grad_norm=args.max_grad_norm,
            bf16=args.bf16,
        )

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The padded micro-batch of the given example indices, on this rank's device."""
        batch = collate([self.examples[i] for i in indices], pad_token_id=self.tokenizer.pad_token_id)
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def train(self) -> None:
        args, log = self.args, get_logger()
        if self.ds:
            self.ds.init_distributed()
        else:
            init_process_group()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # Warm-up and training run on this rank's accelerator; the model was built on the CPU.
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.model.to(self.device)
        ds_config = self.resolve_ds_config(self.user_ds_config, world) if self.ds else None
        order = BatchOrder(len(self.examples), args.per_device_train_batch_size, rank, world, args.seed)
        if order.batches_per_epoch < 1:
            raise ValueError(
                f"{len(self.examples)} examples cannot fill one micro-batch of "
                f"{args.per_device_train_batch_size} on each of {world} ranks."
            )
        total_steps = (
            args.max_steps
            if args.max_steps > 0
            else math.ceil(args.num_train_epochs * order.batches_per_epoch / args.gradient_accumulation_steps)
        )
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if args.overwrite_output_dir and not self.resume:
                for old in checkpoints(self.output_dir):
                    shutil.rmtree(old)
        log.info(
            "%d examples (%d dropped: prompt longer than max_seq_length), %d ranks, %s, %d steps",
            len(self.examples),
            self.dropped,
            world,
            f"DeepSpeed ZeRO stage {self.ds.zero_stage(ds_config)}" if self.ds else f"backend {args.backend}",
            total_steps,
        )
        # Phases 1 and 2: warm-up scoring and selection, or the selection of the checkpoint.
        model = self.model
        if self.resume:
            load_smt_adapter(model, self.resume / "adapter")
            log.info("resuming from %s", self.resume)
        else:
            warmup = (self.batch(indices) for _, indices in order.stream(0))
            start = time.perf_counter()
            scores = collect_block_scores(model, warmup, self.smt_config)
            selection = select_blocks(scores, self.smt_config, total_params=count_parameters(model))
            log.info(
                "warm-up: %d micro-batches per rank in %.1fs",
                args.smt_warmup_steps,
                time.perf_counter() - start,
            )
            apply_smt(model, selection, self.smt_config)
        selection = selection_of(model)
        # Taken now, while every rank still holds whole base weights (ZeRO-3 partitions them later).
        fingerprint = base_fingerprint(model, sorted(selection.blocks))
        check_same_selection(selection)
        summary = selection_summary(selection, self.smt_config, count_parameters(model))
        log.info("selection: %s", summary)
        if rank == 0:
            write_json(self.output_dir / "selection.json", summary)

        # Phase 3: SMT training over the blocks only.
        schedule = lr_lambda(args, total_steps)
        if self.ds:
            backend = DeepSpeedBackend(model, lr_lambda=schedule, args=args, ds_config=ds_config)
        elif args.backend == "fsdp":
            backend = FsdpBackend(model, lr_lambda=schedule, args=args, cpu_offload=args.fsdp_cpu_offload)
        else:
            backend = TorchBackend(model, lr_lambda=schedule, args=args)
        start_step = 0
        if self.resume:
            start_step = load_checkpoint(backend, self.resume)["global_step"]
        else:
            torch.manual_seed(args.seed + rank)  # dropout and anything else stochastic in training
        train_log = JsonlLog(
            self.output_dir / "train_log.jsonl", resume_step=start_step if self.resume else None
        )
        stream = order.stream(start_step * args.gradient_accumulation_steps)

        def write_adapter(path: Path) -> None:
            with backend.gathered(backend.blocks):
                if rank == 0:
                    save_smt_adapter(backend.module, path, config=self.smt_config, fingerprint=fingerprint)

        progress = make_progress(total_steps, start_step, disabled=args.disable_tqdm or rank != 0)
        for step in range(start_step + 1, total_steps + 1):
            began = time.perf_counter()
            losses, tokens, epoch = [], 0, 0
            for _ in range(args.gradient_accumulation_steps):
                epoch, indices = next(stream)
                batch = self.batch(indices)
                loss = backend.loss(batch)
                backend.backward(loss)
                backend.step()
                losses.append(loss.detach().float())
                tokens += int(batch["attention_mask"].sum())
            stats = torch.tensor([torch.stack(losses).mean().item(), float(tokens)], dtype=torch.float64)
            torch.distributed.all_reduce(stats)
            record = {
                "step": step,
                "epoch": epoch,
                "loss": stats[0].item() / world,
                "learning_rate": backend.learning_rate(),
                "tokens_per_second": stats[1].item() / (time.perf_counter() - began),
            }
            if step % args.logging_steps == 0 or step == total_steps:
                train_log.write(record)
            progress.update(1)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['learning_rate']:.2e}",
                tok_s=f"{record['tokens_per_second']:.0f}",
            )
            if args.save_steps and step % args.save_steps == 0:
                state = {
                    "global_step": step,
                    "epoch": epoch,
                    "selection_digest": selection.digest(),
                    "args": args.to_dict(),
                }
                save_checkpoint(
                    backend,
                    self.output_dir,
                    step=step,
                    state=state,
                    write_adapter=write_adapter,
                    keep=args.save_total_limit,
                )
        progress.close()

        write_adapter(self.output_dir / "adapter")
        torch.distributed.barrier()
        if args.merge and rank == 0:
            merged = load_smt_adapter(build_model(args), self.output_dir / "adapter")
            merge_smt(merged)
            with atomic_directory(self.output_dir / "merged") as staging:
                merged.save_pretrained(staging, safe_serialization=True)
                self.tokenizer.save_pretrained(staging)
        torch.distributed.barrier()
        log.info(
            "done: adapter in %s%s",
            self.output_dir / "adapter",
            " and merged model in merged/" if args.merge else "",
        )


def load_tokenizer(model_dir: Path):
    """The model directory's tokenizer, with a pad token (the eos token if it has none)."""
    from transformers import AutoTokenizer

    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"Model directory {model_dir} does not exist (no model hub is reached at run time)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load a tokenizer from {model_dir}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(args: TrainArguments) -> torch.nn.Module:
    """The user's pretrained model, or the embedded tiny Llama initialised from ``--seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = args.model_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json.")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model_name_or_path:
        if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
            raise FileNotFoundError(f"{model_dir} holds no model weights (*.safetensors or *.bin).")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    model.config.use_cache = False
    return model


def lr_lambda(args: TrainArguments, total_steps: int):
    """Learning-rate multiplier per step: linear warm-up, then linear, cosine or constant."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        if args.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def selection_summary(selection, config, total_params: int) -> dict:
    """Blocks per module type, per layer and per group, and each type's share of the budget."""
    summary = selection.summary(config)
    total = selection.num_blocks
    summary["num_blocks"] = total
    summary["trainable_parameters"] = selection.num_parameters
    summary["trainable_percent"] = round(100 * selection.num_parameters / total_params, 4)
    summary["share_by_type"] = {name: round(count / total, 4) for name, count in summary["by_type"].items()}
    summary["modules"] = {name: len(index) for name, index in selection.blocks.items()}
    return summary


def make_progress(total: int, initial: int, *, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disabled, desc="smt", dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
