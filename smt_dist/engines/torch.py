"""The torch backend: no engine and no DDP; ``BlockShardedAdamW`` exchanges exactly the block gradients.

Every rank holds the whole frozen model (as DDP or ZeRO-1/2 would); the optimizer shards the
blocks' fp32 state by whole blocks and owns the gradient exchange (torchrun, mpirun).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from smt_dist.core.selection import BlockSelection
from smt_dist.core.surgery import apply_smt
from smt_dist.engines.base import LoopBackend, load_pretrained
from smt_dist.files.state import load_state, save_state
from smt_dist.optim import BlockShardedAdamW


class TorchBackend(LoopBackend):
    """Plain torch: a whole model per rank, ``BlockShardedAdamW`` over the blocks."""

    name = "torch"

    def load_base(self) -> None:
        model = load_pretrained(
            self.args.model_dir, dtype=self.dtype, device=self.device, quantization=self.quantization
        )
        self.module = self.configure_model(model)

    def build(self, selection: BlockSelection, *, lr_lambda) -> None:
        if self.module is None:
            self.load_base()
        apply_smt(
            self.module, selection, self.smt_config, blocks_dtype=self.dtype if self.quantization else None
        )
        optimizer = BlockShardedAdamW(
            self.blocks,
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            max_grad_norm=self.args.max_grad_norm or None,  # clipped inside step(), on averaged gradients
        )
        self.start_loop(optimizer, lr_lambda)

    def grad_norm(self) -> float | None:
        return self.optimizer.last_grad_norm

    def save(self, directory: Path) -> None:
        """This rank's optimizer shard (safetensors) and the schedule."""
        state = self.optimizer.state_dict()
        tensors = {name: state.pop(name) for name in ("master", "exp_avg", "exp_avg_sq")}
        save_state(directory / f"optimizer_rank{dist.get_rank()}.safetensors", tensors, state)
        self.save_schedule(directory)

    def load(self, directory: Path) -> None:
        path = directory / f"optimizer_rank{dist.get_rank()}.safetensors"
        tensors, state = load_state(path)
        try:
            for group in state["param_groups"]:
                group["betas"] = tuple(group["betas"])
            self.optimizer.load_state_dict({**state, **tensors})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not an optimizer shard written by this job ({err}).") from err
        self.load_schedule(directory)
