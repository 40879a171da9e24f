"""How the training job steps: a DeepSpeed engine, or plain torch with ``BlockShardedAdamW``.

Both take a converted SMT model and expose the same few calls to ``launch/train.py``: a forward
that returns the loss, backward, a per-micro-batch ``step`` that updates at accumulation
boundaries, the learning rate, and saving/loading their state inside a checkpoint directory.
"""

from __future__ import annotations

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


class TorchBackend:
    """No engine and no DDP: ``BlockShardedAdamW`` exchanges exactly the block gradients."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, *, lr_lambda, args: Any) -> None:
        self.module = model
        self.blocks = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = BlockShardedAdamW(
            self.blocks,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.accumulation = args.gradient_accumulation_steps
        self.micro_steps = 0

    def gathered(self, params):  # parameters are never partitioned here
        from contextlib import nullcontext

        return nullcontext()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        """This rank's optimizer shard; rank 0 adds the scheduler (blocks are in the adapter)."""
        rank = dist.get_rank()
        torch.save(self.optimizer.state_dict(), directory / f"optimizer_rank{rank}.pt")
        if rank == 0:
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps},
                directory / "scheduler.pt",
            )

    def load(self, directory: Path) -> None:
        shard = directory / f"optimizer_rank{dist.get_rank()}.pt"
        if not shard.is_file():
            raise FileNotFoundError(
                f"{shard} is missing: was the checkpoint written by this backend and world size?"
            )
        self.optimizer.load_state_dict(torch.load(shard, weights_only=False))
        extra = torch.load(directory / "scheduler.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.micro_steps = extra["micro_steps"]
