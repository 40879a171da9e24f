"""The DeepSpeed backend: a DeepSpeed engine (ZeRO 0-3, offload) over a client AdamW on the blocks.

Under ZeRO-3 the base is partitioned as it is read (transformers loads under ``zero.Init`` while
an ``HfDeepSpeedConfig`` is alive), with ``offload_param`` straight into host memory. The warm-up
runs on that partitioned model under a parameter-only engine's gathering hooks, which is then
destroyed; ``build`` swaps the SMT layers into the same partitioned model (their new block
parameters are partitioned by the training engine) and creates the engine. ZeRO-1/2 keep the whole
frozen model on every rank, as DeepSpeed documents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from smt_dist.model import apply_smt
from smt_dist.selection import BlockSelection
from smt_dist.training.backends.base import Backend, empty_model, load_pretrained

ENGINE_TAG = "engine"


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine over ``torch.optim.AdamW`` on the blocks."""

    name = "deepspeed"

    def __init__(self, args: Any, **kwargs: Any) -> None:
        super().__init__(args, **kwargs)
        from smt_dist import deepspeed as ds

        self.ds = ds
        self.user_config = ds.read_config(args.deepspeed)
        self.config: dict[str, Any] | None = None
        self._partitioned_loading = None  # kept alive: transformers holds it by a weak reference

    @classmethod
    def check(cls, args: Any, *, world_size: int) -> None:
        from smt_dist import deepspeed as ds

        cls._resolve(ds, ds.read_config(args.deepspeed), args, world_size)

    @staticmethod
    def _resolve(ds, config: dict[str, Any], args: Any, world_size: int) -> dict[str, Any]:
        config = ds.resolve_config(
            config,
            micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            world_size=world_size,
            max_grad_norm=args.max_grad_norm,
            bf16=args.bf16,
        )
        return ds.fill_zero3_sizes(config, empty_model(args.model_dir))

    @property
    def zero_stage(self) -> int:
        return self.ds.zero_stage(self.config)

    def init_process_group(self) -> None:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.device)
        self.ds.init_distributed()
        self.config = self._resolve(self.ds, self.user_config, self.args, dist.get_world_size())

    def checkpoint_layout(self) -> dict[str, Any]:
        """DeepSpeed's checkpoint files are per ZeRO stage and per rank."""
        return {**super().checkpoint_layout(), "zero_stage": self.zero_stage}

    def load_base(self) -> None:
        if self.zero_stage == 3:
            from transformers import AutoModelForCausalLM

            self._partitioned_loading = self.ds.partitioned_loading(self.config)
            model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, dtype=self.dtype)
            model.train()
        else:
            model = load_pretrained(self.args.model_dir, dtype=self.dtype, device=self.device)
        self.module = self.configure_model(model)

    @contextlib.contextmanager
    def warmup(self) -> Iterator[Callable[[], None] | None]:
        with self.ds.warmup_engine(self.module, self.config) as after_backward:
            yield after_backward

    def build(self, selection: BlockSelection, *, lr_lambda) -> None:
        if self.module is None:
            self.load_base()
        apply_smt(self.module, selection, self.smt_config)
        optimizer = torch.optim.AdamW(
            self.blocks, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.engine, _, _, self.scheduler = self.ds.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(**batch).loss

    def after_evaluation(self) -> None:
        # ZeRO-3 prefetches the parameters its training trace expects next; a forward with no
        # backward leaves them in flight, and the next gather or save would trip on them.
        self.engine.empty_partition_cache()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        """Engine state without the frozen weights (a collective call)."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        self.ds.read_checkpoints_safely(self.engine)
        load_path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=ENGINE_TAG,
            load_module_strict=False,  # frozen weights were left out on purpose
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"{directory} holds no DeepSpeed engine state under '{ENGINE_TAG}'.")
