"""How the training job steps: a DeepSpeed engine, plain torch with ``BlockShardedAdamW``, or FSDP2.

Both take a converted SMT model and expose the same few calls to ``launch/train.py``: a forward
that returns the loss, backward, a per-micro-batch ``step`` that updates at accumulation
boundaries, the learning rate, and saving/loading their state inside a checkpoint directory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smt_dist.optim import BlockShardedAdamW

ENGINE_TAG = "engine"


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO 0-3, offload) over a client AdamW on the blocks."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, *, lr_lambda, args: Any, ds_config: dict[str, Any]) -> None:
        from smt_dist import deepspeed as ds

        blocks = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(blocks, lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.engine, _, self.scheduler = ds.initialize(model, optimizer, scheduler, ds_config)
        self.gathered = ds.gathered
        self.blocks = blocks
        self.module = self.engine.module

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine(**batch).loss

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
        load_path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=ENGINE_TAG,
            load_module_strict=False,  # frozen weights were left out on purpose
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"{directory} holds no DeepSpeed engine state under '{ENGINE_TAG}'.")


class _LocalLoop:
    """What the torch and FSDP backends share: accumulation, scheduler, and its saved state."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, lr_lambda, args: Any
    ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.accumulation = args.gradient_accumulation_steps
        self.micro_steps = 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            self.clip()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def clip(self) -> None:
        """Clip the gradients before an update (nothing by default)."""

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_schedule(self, directory: Path) -> None:
        if dist.get_rank() == 0:
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps},
                directory / "scheduler.pt",
            )

    def load_schedule(self, directory: Path) -> None:
        extra = torch.load(directory / "scheduler.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.micro_steps = extra["micro_steps"]


class TorchBackend(_LocalLoop):
    """No engine and no DDP: ``BlockShardedAdamW`` exchanges exactly the block gradients."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, *, lr_lambda, args: Any) -> None:
        self.blocks = [p for p in model.parameters() if p.requires_grad]
        optimizer = BlockShardedAdamW(
            self.blocks,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None,  # clipped inside step(), on averaged gradients
        )
        super().__init__(model, optimizer, lr_lambda=lr_lambda, args=args)

    def gathered(self, params):  # parameters are never partitioned here
        return contextlib.nullcontext()

    def save(self, directory: Path) -> None:
        """This rank's optimizer shard and the schedule (the blocks are in the adapter)."""
        torch.save(self.optimizer.state_dict(), directory / f"optimizer_rank{dist.get_rank()}.pt")
        self.save_schedule(directory)

    def load(self, directory: Path) -> None:
        shard = directory / f"optimizer_rank{dist.get_rank()}.pt"
        if not shard.is_file():
            raise FileNotFoundError(
                f"{shard} is missing: was the checkpoint written by this backend and world size?"
            )
        self.optimizer.load_state_dict(torch.load(shard, weights_only=False))
        self.load_schedule(directory)


class FsdpBackend(_LocalLoop):
    """FSDP2 units per decoder layer; torch AdamW on the sharded (DTensor) blocks."""

    name = "fsdp"

    def __init__(self, model: torch.nn.Module, *, lr_lambda, args: Any, cpu_offload: bool = False) -> None:
        from smt_dist.distributed.fsdp import shard_model

        shard_model(model, cpu_offload=cpu_offload)
        self.blocks = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.blocks, lr=args.learning_rate, weight_decay=args.weight_decay)
        super().__init__(model, optimizer, lr_lambda=lr_lambda, args=args)
        self.max_grad_norm = args.max_grad_norm

    def gathered(self, params):
        from smt_dist.distributed.fsdp import unsharded

        return unsharded(self.module)

    def clip(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.blocks, self.max_grad_norm)  # global norm over DTensors

    def _states(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True)
        return {
            "model": get_model_state_dict(self.module, options=options),
            "optim": get_optimizer_state_dict(self.module, self.optimizer, options=options),
        }

    def save(self, directory: Path) -> None:
        """Sharded blocks and optimizer state through torch.distributed.checkpoint (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(), checkpoint_id=str(directory / "fsdp"))
        self.save_schedule(directory)

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (directory / "fsdp").is_dir():
            raise FileNotFoundError(f"{directory} holds no FSDP state: was it written by --backend fsdp?")
        states = self._states()
        dcp.load(states, checkpoint_id=str(directory / "fsdp"))
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.module, states["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, states["optim"], options=options)
        self.load_schedule(directory)
