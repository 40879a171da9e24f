"""Fine-tune a causal LM with Sparse Matrix Tuning: warm-up, selection, training, adapter, merge.

    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_smt.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed configs/zero3_smt.json
    torchrun --nproc_per_node 2 launch/train.py --backend fsdp
    mpirun -n 2 python launch/train.py
    python -m smt_dist.recipes.finetune ...          # the same job from an installed package

With no --model_name_or_path/--data_path it trains the embedded tiny Llama (models/tiny-llama) on
the embedded instruction set (data/tiny_instruct.jsonl), both found from the working directory (a
checkout of the repository). The recipe, on every rank:

  1. check every input, before any process group or file exists;
  2. join the process group; every rank must run the same job (checked);
  3. load the base as the engine keeps it (ZeRO-3 and FSDP2: partitioned as it is read), check
     its weights are finite, warm up (each target's block statistic inside its own backward,
     summed across ranks), select, and check every rank selected the same blocks;
  4. build: SparseLinear swapped in, the engine created, a checkpoint restored with --resume;
  5. train over the blocks only, with checkpoints every --save_steps;
  6. save the adapter (only the blocks are gathered) and, with --merge, stream a merged Hugging
     Face checkpoint from the base's safetensors shards.

No phase holds the whole frozen model on one rank under ZeRO-3 or FSDP2. Bad input stops the job
with one sentence from one rank and exit code 1, before anything is written or deleted; an
earlier run replaced with --overwrite_output_dir stays whole until the new run has a checkpoint or
its adapter (till then the new run's log and selection wait in ``.new-run/``).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from smt_dist.core.blocks import weight_shape
from smt_dist.core.quantized import dequantized, quantization
from smt_dist.core.selection import BlockSelection, budget_in_blocks, check_budget_fits
from smt_dist.core.surgery import count_parameters, find_targets
from smt_dist.distributed import all_finite, check_ranks_agree, rank, world_size
from smt_dist.distributed.launch import leave_process_group
from smt_dist.distributed.params import local_data
from smt_dist.engines import backend_class
from smt_dist.files.adapter import (
    base_fingerprint,
    check_fingerprint,
    checkpoint_fingerprint,
    read_smt_adapter,
    save_smt_adapter,
)
from smt_dist.files.atomic import write_json
from smt_dist.files.base_checkpoint import SafetensorsCheckpoint
from smt_dist.files.merge import merge_checkpoint
from smt_dist.files.model_dir import check_vocabulary, check_weights, empty_model
from smt_dist.files.selection_file import adapter_selection, read_selection, write_selection
from smt_dist.files.state import read_checkpoint_json
from smt_dist.integrations.prepare import choose_blocks
from smt_dist.recipes.arguments import TrainArguments, parse_args
from smt_dist.recipes.checkpoints import (
    STATE_NAME,
    check_resume,
    check_writable,
    checkpoints,
    find_checkpoint,
    load_checkpoint,
    remove_stale,
    save_checkpoint,
)
from smt_dist.recipes.data import (
    BatchOrder,
    collate,
    data_digest,
    load_tokenizer,
    pack_examples,
    read_chat_template,
    read_dataset,
)
from smt_dist.recipes.failures import USER_ERRORS, claim_report, peer_failed, reported_writes
from smt_dist.recipes.logs import JsonlLog, get_logger, make_progress
from smt_dist.recipes.memory import PhaseMemory
from smt_dist.recipes.reporting import Reporters, parse_report_to
from smt_dist.recipes.schedule import lr_lambda
from smt_dist.recipes.tokenized import hold_out, tokenized_dataset

RUN_MARKERS = ("train_log.jsonl", "adapter", "selection.json")
NEW_RUN = ".new-run"  # an overwriting run's own files, until it has proven itself


def main(argv: list[str] | None = None) -> int:
    recipe = None
    try:
        recipe = SMTRecipe(parse_args(argv))
        recipe.setup()
        recipe.select()
        recipe.build()
        recipe.train()
        recipe.save()
        leave_process_group()
    except USER_ERRORS as err:
        if claim_report(str(err), rank=rank()):
            print(f"train.py: error: {err}", file=sys.stderr)
        leave_process_group(together=False)
        return 1
    except Exception:
        if peer_failed():  # another rank stopped the job and said why; this one leaves quietly
            leave_process_group(together=False)
            return 1
        raise
    finally:
        if recipe is not None:
            recipe.cleanup()
    return 0


class SMTRecipe:
    """One run. ``__init__`` checks every input before a process group exists; the phases follow."""

    def __init__(self, args: TrainArguments) -> None:
        self.args = args
        self.smt_config = args.smt_config()
        self.output_dir = Path(args.output_dir)
        check_writable(self.output_dir)
        self.resume = (
            find_checkpoint(args.resume_from_checkpoint, self.output_dir)
            if args.resume_from_checkpoint
            else None
        )
        previous = [m for m in RUN_MARKERS if (self.output_dir / m).exists()] + checkpoints(self.output_dir)
        if not self.resume and not args.overwrite_output_dir and previous:
            raise ValueError(
                f"{self.output_dir} already holds a run; pass --overwrite_output_dir to replace it "
                "or --resume_from_checkpoint to continue it."
            )
        # An overwritten run's checkpoints go once this run has one of its own (or its adapter).
        self.stale = [] if self.resume else checkpoints(self.output_dir)
        self.run_files = self.output_dir / NEW_RUN if previous and not self.resume else self.output_dir
        meta_model = empty_model(args.model_dir)  # config.json first: the tokenizer reads it too
        self.tokenizer = load_tokenizer(args.model_dir)
        check_vocabulary(args.model_dir, self.tokenizer, meta_model)
        if args.chat_template:
            self.tokenizer.chat_template = read_chat_template(args.chat_template)
        records, data_format = read_dataset(args.data_file, args.dataset_format, split=args.dataset_split)
        self.data_digest = data_digest(args.data_file, records)
        tokenize = functools.partial(
            tokenized_dataset,
            tokenizer=self.tokenizer,
            max_seq_length=args.max_seq_length,
            dataset_format=data_format,
            assistant_only_loss=args.assistant_only_loss,
            num_proc=args.dataset_num_proc,
        )
        self.examples, self.dropped = tokenize(records, source=str(args.data_file))  # once per node
        self.val_examples: Any = []
        if args.val_set_size:
            self.examples, self.val_examples = hold_out(self.examples, args.val_set_size, seed=args.seed)
        elif args.eval_data_path:
            eval_records = read_dataset(args.eval_data_path, data_format)[0]
            self.val_examples, _ = tokenize(eval_records, source=args.eval_data_path)
        if args.packing:  # after the hold-out: validation examples are scored one by one
            self.examples = pack_examples(self.examples, max_seq_length=args.max_seq_length)
        self.given_selection = self._check_model(meta_model)
        # Built now, with the world size the launcher announced, so a bad engine config writes nothing.
        self.backend = backend_class(args.backend)(
            args, smt_config=self.smt_config, meta_model=meta_model, world_size=world_size()
        )
        if self.resume:
            self.resume_state = read_checkpoint_json(self.resume / STATE_NAME, what="trainer state")
            check_resume(self.resume, self.resume_state, args.to_dict(), {"data": self.data_digest})
            self.resume_selection = adapter_selection(self.resume / "adapter")
            if self.resume_selection.digest() != self.resume_state.get("selection_digest"):
                raise ValueError(
                    f"{self.resume}: its adapter does not hold the blocks its trainer state names."
                )
        self.memory = PhaseMemory(enabled=args.report_memory)
        self.reporters: Reporters | None = None

    def _check_model(self, model: torch.nn.Module) -> BlockSelection | None:
        """Check the model directory, targets, block size and budget on a weightless copy of the model.

        Returns the selection of ``--smt_selection``, checked against the model, if one was given.
        """
        check_weights(self.args.model_dir, model)  # every weight there, each with the config's shape
        targets = find_targets(model, self.smt_config)  # checks block size against every target
        if self.args.smt_selection:
            return read_selection(Path(self.args.smt_selection), model, self.smt_config)
        total_blocks = (
            sum(weight_shape(t.weight).numel() for t in targets.values()) // self.smt_config.block_size**2
        )
        budget = budget_in_blocks(self.smt_config, total_params=count_parameters(model))
        check_budget_fits(budget, available=total_blocks, modules=len(targets))
        return None

    # ---- 1-2. process group, agreement, data order ------------------------------------------------

    def setup(self) -> None:
        args, log = self.args, get_logger()
        self.backend.init_process_group()
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        per_rank = ("local_rank",)
        check_ranks_agree(
            {"the backend": self.backend.name}
            | {f"--{k}": v for k, v in args.to_dict().items() if k not in per_rank}
            | {"the training data": self.data_digest}
        )
        self.backend.after_agreement()
        self.layout = self.backend.checkpoint_layout()
        if self.resume:
            check_resume(
                self.resume, self.resume_state, args.to_dict(), {"data": self.data_digest, **self.layout}
            )
        self.order = BatchOrder(
            len(self.examples), args.per_device_train_batch_size, self.rank, self.world, args.seed
        )
        if self.order.batches_per_epoch < 1:
            raise ValueError(
                f"{len(self.examples)} examples cannot fill one micro-batch of "
                f"{args.per_device_train_batch_size} on each of {self.world} ranks."
            )
        self.total_steps = (
            args.max_steps
            if args.max_steps > 0
            else math.ceil(
                args.num_train_epochs * self.order.batches_per_epoch / args.gradient_accumulation_steps
            )
        )
        log.info(
            "%d %s (%d dropped: prompt longer than max_seq_length), %d ranks, backend %s, %d steps",
            len(self.examples),
            "packed rows" if self.args.packing else "examples",
            self.dropped,
            self.world,
            self.backend.name,
            self.total_steps,
        )

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The padded micro-batch of the given example indices, on this rank's device."""
        batch = collate([self.examples[i] for i in indices], pad_token_id=self.tokenizer.pad_token_id)
        return {name: tensor.to(self.backend.device) for name, tensor in batch.items()}

    # ---- 3. load, warm up, select ----------------------------------------------------------------

    def select(self) -> None:
        log = get_logger()
        self.scores = None
        if self.resume:
            self.selection = self.resume_selection
            log.info("resuming from %s", self.resume)
        elif self.given_selection is not None:
            self.selection = self.given_selection
            log.info("training the blocks of %s; no warm-up", self.args.smt_selection)
        else:
            with self.memory.phase("load"):
                self.backend.load_base()
                self.check_finite_base()
            with self.memory.phase("warmup"):
                start = time.perf_counter()
                warmup = (self.batch(indices) for _, indices in self.order.stream(0))
                with self.backend.warmup() as after_backward:
                    self.selection, self.scores = choose_blocks(
                        self.backend.module, warmup, self.smt_config, after_backward=after_backward
                    )
                log.info(
                    "warm-up: %d micro-batches per rank in %.1fs",
                    self.args.smt_warmup_steps,
                    time.perf_counter() - start,
                )
        log.info("selection: %s", self.selection.summary(self.smt_config))

    def check_finite_base(self) -> None:
        """Refuse a base with NaN or infinite weights (each rank checks what it holds; a
        quantized layer, the weight it computes with)."""
        model = self.backend.module
        quantized = [
            m for m in model.modules() if quantization(m) is not None and not hasattr(m, "base_layer")
        ]
        packed = {id(m.weight) for m in quantized}
        tensors = [local_data(p) for p in model.parameters() if id(p) not in packed]
        if not all_finite(tensors + [dequantized(m) for m in quantized]):
            raise ValueError(
                f"The weights in {self.args.model_dir} hold NaN or infinity; SMT cannot train on them."
            )

    # ---- 4. build the training engine -----------------------------------------------------------

    def build(self) -> None:
        with self.memory.phase("build"):
            loaded_here = self.backend.module is None or self.backend.loads_in_build
            self.backend.build(self.selection, lr_lambda=lr_lambda(self.args, self.total_steps))
            if loaded_here and self.scores is None:
                self.check_finite_base()
            names = sorted(self.selection.blocks)
            self.fingerprint = (
                base_fingerprint(self.backend.module, names)
                if self.backend.quantization is None  # a quantized base: the float weights it came from
                else checkpoint_fingerprint(SafetensorsCheckpoint(self.args.model_dir), names)
            )
            frozen = count_parameters(self.backend.module) - self.selection.num_parameters
        check_ranks_agree({"the base weights (fingerprint)": repr(self.fingerprint)})
        self.start_step = 0
        if self.resume:
            meta, _ = read_smt_adapter(self.resume / "adapter")
            check_fingerprint(meta["base_fingerprint"], self.fingerprint, self.resume / "adapter")
            self.start_step = load_checkpoint(self.backend, self.resume)["global_step"]
        else:
            torch.manual_seed(self.args.seed + self.rank)  # dropout and anything else stochastic
        # Every input is checked and every rank holds its state (a rank whose checkpoint files
        # are bad fails above, and its peers here): the run may now write into its output directory.
        torch.distributed.barrier()
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                if self.run_files != self.output_dir:  # left by an overwriting run that failed
                    shutil.rmtree(self.run_files, ignore_errors=True)
                    self.run_files.mkdir()
                write_selection(self.run_files, self.selection, self.scores, self.smt_config, frozen)
        trainable = self.selection.num_parameters
        self.run_summary = {
            "trainable_parameters": trainable,
            "trainable_percent": 100 * trainable / (trainable + frozen),
            "selection": self.selection.summary(self.smt_config),
        }

    # ---- 5. train --------------------------------------------------------------------------------

    def train(self) -> None:
        args, backend = self.args, self.backend
        self.train_log = JsonlLog(
            self.run_files / "train_log.jsonl", resume_step=self.start_step if self.resume else None
        )
        self.open_reporters()
        stream = self.order.stream(self.start_step * args.gradient_accumulation_steps)
        progress = make_progress(
            self.total_steps, self.start_step, disabled=args.disable_tqdm or self.rank != 0
        )
        postfix: dict[str, str] = {}
        for step in range(self.start_step + 1, self.total_steps + 1):
            with self.memory.phase("train"):
                began = time.perf_counter()
                losses, tokens, epoch = [], 0, 0
                for _ in range(args.gradient_accumulation_steps):
                    epoch, indices = next(stream)
                    batch = self.batch(indices)
                    loss = backend.loss(batch)
                    backend.backward(loss)
                    backend.step()
                    losses.append(loss.detach().float())
                    tokens += sum(len(self.examples[i]["input_ids"]) for i in indices)  # no padding
                # summed over ranks: the mean loss, all tokens, and each rank's memory in its slot
                stats = torch.zeros(2 + self.world, dtype=torch.float64)
                stats[0], stats[1] = torch.stack(losses).mean().item(), float(tokens)
                stats[2 + self.rank] = self.memory.current_peak_mib()
                stats = stats.to(backend.device)
                torch.distributed.all_reduce(stats)
                stats = stats.cpu()
            record = {
                "step": step,
                "epoch": epoch,
                "loss": stats[0].item() / self.world,
                "learning_rate": backend.learning_rate(),
                "tokens_per_second": stats[1].item() / (time.perf_counter() - began),
            }
            if (norm := backend.grad_norm()) is not None:
                record["grad_norm"] = norm
            record["memory_mib"] = [round(v, 1) for v in stats[2:].tolist()]
            if not math.isfinite(record["loss"]):
                raise ValueError(
                    f"The loss became {record['loss']} at step {step}; lower --learning_rate or check the data."
                )
            last = step == self.total_steps
            if self.val_examples and (last or (args.eval_steps and step % args.eval_steps == 0)):
                record["eval_loss"] = self.validate()
                postfix["eval_loss"] = f"{record['eval_loss']:.4f}"
            if step % args.logging_steps == 0 or last or "eval_loss" in record:
                self.train_log.write(record)
                self.reporters.log(_metrics(record), step)
            progress.update(1)
            postfix.update(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['learning_rate']:.2e}",
                tok_s=f"{record['tokens_per_second']:.0f}",
            )
            progress.set_postfix(postfix)
            if args.save_steps and step % args.save_steps == 0:
                with self.memory.phase("save"):
                    state = {
                        "global_step": step,
                        "epoch": epoch,
                        "selection_digest": self.selection.digest(),
                        "args": args.to_dict(),
                        "run": {"data": self.data_digest, **self.layout},
                        "reporting": self.reporters.identity,
                    }
                    save_checkpoint(
                        backend,
                        self.output_dir,
                        step=step,
                        state=state,
                        write_adapter=self.write_adapter,
                        keep=args.save_total_limit,
                        stale=self.stale,
                    )
                    self.take_over()
        progress.close()
        self.reporters.close()

    def open_reporters(self) -> None:
        """The tools of --report_to, on rank 0; a resumed run reports into the runs it continues."""
        identity = self.resume_state.get("reporting") if self.resume else None
        identity = identity if isinstance(identity, dict) else {}
        run_name = self.args.run_name or identity.get("run_name") or time.strftime("%b%d_%H-%M-%S")
        self.reporters = Reporters(
            parse_report_to(self.args.report_to),
            output_dir=self.output_dir,
            run_name=run_name,
            config=self.args.to_dict(),
            resume_step=self.start_step if self.resume else None,
            identity={k: str(v) for k, v in identity.items() if k != "run_name"},
            enabled=self.rank == 0,
        )
        if not self.resume:
            self.reporters.summary(self.run_summary)

    def validate(self) -> float:
        """Mean loss per label token over the validation examples; every rank takes a slice.

        Every rank runs the same number of forwards (ZeRO-3 and FSDP2 gather in each), a rank
        short of examples repeating one with weight zero.
        """
        size = self.args.per_device_train_batch_size
        mine = list(range(self.rank, len(self.val_examples), self.world))
        forwards = math.ceil(math.ceil(len(self.val_examples) / self.world) / size)
        total = torch.zeros(2, dtype=torch.float64)
        module = self.backend.module
        module.eval()
        with torch.no_grad():
            for first in range(0, forwards * size, size):
                part = mine[first : first + size]
                rows = [self.val_examples[i] for i in part] or [self.val_examples[0]]
                batch = collate(rows, pad_token_id=self.tokenizer.pad_token_id)
                loss = self.backend.loss({k: v.to(self.backend.device) for k, v in batch.items()})
                tokens = float((batch["labels"][:, 1:] != -100).sum()) if part else 0.0
                total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64)
        module.train()
        self.backend.after_evaluation()
        total = total.to(self.backend.device)
        torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item()

    def write_adapter(self, path: Path) -> None:
        """The adapter, from the blocks alone (gathered where partitioned; rank 0 writes)."""
        save_smt_adapter(self.backend.module, path, config=self.smt_config, fingerprint=self.fingerprint)

    def take_over(self) -> None:
        """This run has a checkpoint or its adapter: its files replace the run it overwrites."""
        if self.rank == 0:
            remove_stale(self.stale)
            if self.run_files != self.output_dir:
                for path in sorted(self.run_files.iterdir()):
                    os.replace(path, self.output_dir / path.name)
                self.run_files.rmdir()
        self.stale, self.run_files = [], self.output_dir
        self.train_log.path = self.output_dir / "train_log.jsonl"

    # ---- 6. save and merge -----------------------------------------------------------------------

    def save(self) -> None:
        adapter = self.output_dir / "adapter"
        with self.memory.phase("save"), reported_writes(f"Writing the adapter to {adapter}"):
            self.write_adapter(adapter)
        torch.distributed.barrier()
        self.take_over()
        if self.args.merge:
            with self.memory.phase("merge"), reported_writes(f"Writing {self.output_dir / 'merged'}"):
                if self.rank == 0:
                    merge_checkpoint(
                        self.args.model_dir,
                        self.output_dir / "adapter",
                        self.output_dir / "merged",
                        dtype=self.backend.dtype,
                    )
                torch.distributed.barrier()
        if self.args.report_memory:
            self.write_memory_report()
        get_logger().info(
            "done: adapter in %s%s",
            self.output_dir / "adapter",
            " and merged model in merged/" if self.args.merge else "",
        )

    def write_memory_report(self) -> None:
        """``memory.json``: every rank's peak MiB per phase."""
        reports: list[dict | None] = [None] * self.world
        torch.distributed.all_gather_object(reports, self.memory.report())
        if self.rank == 0:
            write_json(self.output_dir / "memory.json", {"ranks": reports, "backend": self.backend.name})

    def cleanup(self) -> None:
        self.memory.close()
        if self.reporters is not None:
            self.reporters.close()
        if self.run_files != self.output_dir and rank() == 0:  # failed before it could take over
            shutil.rmtree(self.run_files, ignore_errors=True)


def _metrics(record: dict) -> dict[str, float]:
    """A training-log record as the scalars TensorBoard, W&B and MLflow plot."""
    metrics = {
        f"train/{k}": record[k]
        for k in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch")
        if k in record
    }
    if "eval_loss" in record:
        metrics["eval/loss"] = record["eval_loss"]
    for index, mib in enumerate(record["memory_mib"]):
        metrics[f"memory/rank{index}_mib"] = mib
    return metrics


if __name__ == "__main__":
    sys.exit(main())
