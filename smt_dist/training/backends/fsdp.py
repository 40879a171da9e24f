"""The FSDP2 backend: a model built sharded (one unit per decoder layer), torch AdamW on the blocks.

No rank ever holds the whole model: the base is built on the meta device, sharded, and each rank
reads only its own rows from the safetensors files (``smt_dist.distributed.fsdp.load_sharded``).
The warm-up runs on that sharded model, FSDP gathering each layer for its forward and backward.
FSDP2 cannot add parameters to a sharded model, so ``build`` drops the warm-up model and builds
the training model the same way with the SMT layers already in place; the blocks are sharded whole
on dim 0, and only their gradients are reduce-scattered.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from smt_dist.model import apply_smt
from smt_dist.selection import BlockSelection
from smt_dist.training.backends.base import LocalLoop


class FsdpBackend(LocalLoop):
    """FSDP2 units per decoder layer; torch AdamW on the sharded (DTensor) blocks."""

    name = "fsdp"

    def checkpoint_layout(self) -> dict:
        """Any world size: torch.distributed.checkpoint reshards the blocks and their state."""
        return {"backend": self.name}

    def load_base(self) -> None:
        self.module = self._load(prepare=self.configure_model)

    def build(self, selection: BlockSelection, *, lr_lambda) -> None:
        self.module = None
        gc.collect()  # the warm-up model's shards go before the training model's arrive

        def prepare(model: torch.nn.Module) -> None:
            apply_smt(model, selection, self.smt_config)
            self.configure_model(model)

        self.module = self._load(prepare=prepare)
        optimizer = torch.optim.AdamW(
            self.blocks, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        self.start_loop(optimizer, lr_lambda)

    def _load(self, *, prepare) -> torch.nn.Module:
        from smt_dist.distributed.fsdp import load_sharded

        return load_sharded(
            self.args.model_dir,
            dtype=self.dtype,
            device=self.device,
            cpu_offload=self.args.fsdp_cpu_offload,
            prepare=prepare,
        )

    def clip(self) -> None:
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.blocks, self.args.max_grad_norm)  # global norm over DTensors

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
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from smt_dist.distributed.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

        path = directory / "fsdp"
        if not path.is_dir():
            raise FileNotFoundError(f"{directory} holds no FSDP state: was it written by --backend fsdp?")
        SafeFileSystemReader(str(path)).read_metadata()  # refuses unsafe metadata in one sentence
        states = self._states()
        # DCP logs each rank's failure with a traceback before raising them together; the
        # sentence below says what failed.
        dcp_logger = logging.getLogger("torch.distributed.checkpoint")
        level = dcp_logger.level
        dcp_logger.setLevel(logging.CRITICAL)
        try:
            dcp.load(states, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(path))
        except CheckpointException as err:  # DCP gathers every rank's failure into one exception
            raise ValueError(f"The FSDP state in {path} cannot be read: {_first_failure(err)}") from err
        finally:
            dcp_logger.setLevel(level)
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.module, states["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, states["optim"], options=options)
        self.load_schedule(directory)


def _first_failure(err: Exception) -> str:
    """The most telling line of a DCP failure: ours (a ValueError) where there is one."""
    failures = list(getattr(err, "failures", {}).values()) or [err]
    first = failures[0][0] if isinstance(failures[0], tuple) else failures[0]  # (exception, stack)
    text = str(first).strip()
    for line in text.replace("; ", "\n").splitlines():
        if "is not checkpoint metadata" in line or "refusing to load" in line:
            return line.split("read failed: ")[-1].strip()
    detail = text.splitlines()[-1][:300] if text else "the files are truncated or damaged"
    return f"{type(first).__name__}: {detail}."
