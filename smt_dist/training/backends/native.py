"""The torch backend: no engine and no DDP; ``BlockShardedAdamW`` exchanges exactly the block gradients.

Every rank holds the whole frozen model (as DDP or ZeRO-1/2 would); the optimizer shards the
blocks' fp32 state by whole blocks and owns the gradient exchange (torchrun, mpirun).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from smt_dist.model import apply_smt
from smt_dist.optim import BlockShardedAdamW
from smt_dist.selection import BlockSelection
from smt_dist.training.backends.base import LocalLoop, load_pretrained


class TorchBackend(LocalLoop):
    """Plain torch: a whole model per rank, ``BlockShardedAdamW`` over the blocks."""

    name = "torch"

    def load_base(self) -> None:
        model = load_pretrained(self.args.model_dir, dtype=self.dtype, device=self.device)
        self.module = self.configure_model(model)

    def build(self, selection: BlockSelection, *, lr_lambda) -> None:
        if self.module is None:
            self.load_base()
        apply_smt(self.module, selection, self.smt_config)
        optimizer = BlockShardedAdamW(
            self.blocks,
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            max_grad_norm=self.args.max_grad_norm or None,  # clipped inside step(), on averaged gradients
        )
        self.start_loop(optimizer, lr_lambda)

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
        self.optimizer.load_state_dict(torch.load(shard, weights_only=True))
        self.load_schedule(directory)
