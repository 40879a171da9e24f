"""The seam between the training job and an engine: what every backend does, and in which order.

The job builds the backend before any process group exists (its constructor refuses what the
engine cannot run), then calls, on every rank: ``init_process_group``; ``after_agreement`` once
every rank is known to run the same job on the same backend; unless the selection is
given, ``load_base`` and the warm-up inside ``warmup()``; ``build`` (SMT layers in place, engine
ready); per micro-batch ``loss``, ``backward``, ``step``; ``save`` and ``load`` for checkpoints.
Each engine decides how its model is loaded (whole, or partitioned as it is read), what gathers
weights during the warm-up, and what its checkpoint holds; where engines differ in what the job
must do (``loads_in_build``), the backend says so in an attribute, and the job never asks which
engine it has.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from smt_dist.core.config import SMTConfig
from smt_dist.core.selection import BlockSelection
from smt_dist.core.surgery import no_backward_below_blocks
from smt_dist.files.atomic import write_json
from smt_dist.files.quantization import Quantization
from smt_dist.files.state import read_checkpoint_json


class Backend(abc.ABC):
    """One engine's way of loading, warming up, training and saving an SMT model.

    Built before any process group or file exists: a constructor refuses (``ValueError``, one
    sentence) what its engine cannot run.

    Args:
        args: The job's ``TrainArguments``.
        smt_config: The run's SMT configuration.
        meta_model: The model's modules on the meta device (names and shapes, no memory).
        world_size: The job's world size as its launcher announced it.
    """

    name: ClassVar[str]
    loads_in_build: ClassVar[bool] = False
    """True when ``build`` loads the base anew (its weights then still need the finiteness check)."""
    quantized_base: ClassVar[str | None] = None
    """Why this engine cannot train over a quantized base, naming the alternative (``None``: it can)."""

    def __init__(self, args: Any, *, smt_config: SMTConfig, meta_model: nn.Module, world_size: int) -> None:
        self.args = args
        self.smt_config = smt_config
        self.quantization = args.quantization()
        if self.quantization is not None and self.quantized_base is not None:
            raise ValueError(f"A quantized base ({self.quantization.describe()}) {self.quantized_base}")
        self.module: nn.Module | None = None
        """The model this backend trains (after ``load_base`` or ``build``)."""

    @property
    def device(self) -> torch.device:
        """This rank's compute device."""
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's parameters."""
        return torch.bfloat16 if self.args.bf16 else torch.float32

    def init_process_group(self) -> None:
        """Join the job's process group (torchrun's environment, or mpi4py under mpirun)."""
        from smt_dist.distributed.launch import init_process_group

        init_process_group()

    def after_agreement(self) -> None:  # noqa: B027 (an optional hook: most engines need nothing)
        """Once every rank is known to run this job on this backend: collectives of the engine's own."""

    def checkpoint_layout(self) -> dict[str, Any]:
        """What a checkpoint of this engine depends on; a resume must match it."""
        return {"backend": self.name, "world_size": dist.get_world_size()}

    @abc.abstractmethod
    def load_base(self) -> None:
        """Load the base model into ``self.module``, partitioned as this engine keeps it."""

    @contextlib.contextmanager
    def warmup(self) -> Iterator[Callable[[], None] | None]:
        """Forward and backward on ``self.module`` work inside; yields a per-backward clean-up."""
        yield None

    @abc.abstractmethod
    def build(self, selection: BlockSelection, *, lr_lambda: Callable[[int], float]) -> None:
        """SMT layers for ``selection`` in ``self.module`` (loading it if needed); engine ready.

        ``lr_lambda`` is the learning-rate multiplier per optimizer step.
        """

    @abc.abstractmethod
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The forward pass's loss for one micro-batch."""

    def after_evaluation(self) -> None:  # noqa: B027 (an optional hook: most engines need nothing)
        """Release what forwards without a backward left gathered (nothing, but under ZeRO-3)."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward for one micro-batch (scaled for gradient accumulation)."""

    @abc.abstractmethod
    def step(self) -> None:
        """After every micro-batch: an optimizer step at accumulation boundaries."""

    @abc.abstractmethod
    def learning_rate(self) -> float:
        """The current learning rate."""

    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm before clipping (``None``: not computed)."""
        return None

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write this engine's training state into a checkpoint directory (a collective call)."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore this engine's training state from a checkpoint directory (a collective call)."""

    @property
    def blocks(self) -> list[nn.Parameter]:
        """The trainable block parameters."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def configure_model(self, model: nn.Module) -> nn.Module:
        """Training switches every engine applies to a freshly built model."""
        model.config.use_cache = False
        if self.args.gradient_checkpointing:
            # Non-reentrant: layers below the lowest selected block then need no backward at all.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            no_backward_below_blocks(model)  # transformers would make every layer run a backward
        return model


def load_pretrained(
    model_dir: Path, *, dtype: torch.dtype, device: torch.device, quantization: Quantization | None = None
) -> nn.Module:
    """A whole Hugging Face causal LM on ``device``, for engines that keep one on every rank;
    its linears quantized as they load with ``quantization``."""
    from transformers import AutoModelForCausalLM

    if quantization is not None:  # quantized where it is placed; transformers refuses .to() after
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            device_map={"": device},
            quantization_config=quantization.transformers_config(dtype),
        )
        model.train()
        return model
    device_map = {"": device} if device.type == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
    model.train()
    return model.to(device)


SCHEDULE_NAME = "scheduler.json"


class LoopBackend(Backend):
    """A backend whose loop the job runs itself (no engine): accumulation, the schedule, its state.

    The torch and FSDP backends share it; DeepSpeed's engine does all of this on its own.
    """

    optimizer: torch.optim.Optimizer

    def start_loop(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float]) -> None:
        """Adopt the optimizer and put the schedule on it."""
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.micro_steps = 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.args.gradient_accumulation_steps).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.args.gradient_accumulation_steps == 0:
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
            write_json(
                directory / SCHEDULE_NAME,
                {"scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps},
            )

    def load_schedule(self, directory: Path) -> None:
        path = directory / SCHEDULE_NAME
        extra = read_checkpoint_json(path, what="learning-rate schedule")
        try:
            self.scheduler.load_state_dict(extra["scheduler"])
            self.micro_steps = int(extra["micro_steps"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a schedule written by this job ({err}).") from err
