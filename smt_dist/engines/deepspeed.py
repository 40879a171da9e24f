"""The DeepSpeed engine: everything SMT needs of DeepSpeed, and the job's backend on it.

SMT's block parameters are the model's only trainable parameters, so a DeepSpeed engine
partitions just them and their Adam states (ZeRO-1/2), reduces just their gradients, and under
ZeRO-3 also partitions the frozen base. This module turns a user's DeepSpeed JSON into one that
fits the run (``"auto"`` values filled from the command line, conflicts refused with one
sentence), loads a model partitioned as it is read (ZeRO-3), warms it up under the engine's own
gathering, builds the training engine (``initialize``), reads its checkpoints as data, and is the
job's ``DeepSpeedBackend``. It is the one module that imports ``deepspeed`` at the top; the
partitioned-parameter helpers in ``smt_dist.distributed.params`` import it lazily, and only
for parameters DeepSpeed made.

The backend: under ZeRO-3 the base is partitioned as it is read (transformers loads under
``zero.Init`` while an ``HfDeepSpeedConfig`` is alive), with ``offload_param`` straight into host
memory. The warm-up runs on that partitioned model under a parameter-only engine's gathering
hooks, which is then destroyed; ``build`` swaps the SMT layers into the same partitioned model
(their new block parameters are partitioned by the training engine) and creates the engine.
ZeRO-1/2 keep the whole frozen model on every rank, as DeepSpeed documents.

Swapping SMT into an existing DeepSpeed script takes two changed lines::

    model = smt_dist.deepspeed.prepare(model, warmup_batches, SMTConfig(...), config=ds_config)
    engine, optimizer, _, scheduler = smt_dist.deepspeed.initialize(model=model, ..., config=ds_config)

with either a client ``torch.optim.AdamW`` over the blocks (ZeRO 1-3 partition them) or, at
ZeRO stage 0, ``BlockShardedAdamW``, which then owns the gradient exchange: the engine's own
all-reduce is switched off, as DeepSpeed's 1-bit Adam does.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import json
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# DeepSpeed picks its accelerator on first import; on a machine without CUDA say so explicitly,
# so a CPU run never probes for GPUs (and works where the env var was forgotten).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from deepspeed.accelerator import get_accelerator

from smt_dist.core.selection import BlockSelection
from smt_dist.core.surgery import apply_smt, count_parameters, decoder_layers
from smt_dist.engines.base import Backend, load_pretrained
from smt_dist.files.jsonfile import read_json
from smt_dist.optim import BlockShardedAdamW

ENGINE_TAG = "engine"


def on_cpu() -> bool:
    """True when DeepSpeed runs on its CPU accelerator."""
    return get_accelerator().device_name() == "cpu"


def init_distributed() -> None:
    """Join the job's process group (env vars from deepspeed/torchrun, or mpi4py under mpirun)."""
    # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT itself; keep one the user chose.
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl", distributed_port=port)


def release_shared_memory() -> None:
    """Unlink this rank's segment of DeepSpeed's CPU all-reduce buffer once every rank has it mapped.

    On CPU, joining the group makes each rank create ``/dev/shm/deepspeed_allreduce_buffer_<uid>_
    <addr>_<port>_<rank>`` (66 MB) and map every peer's; DeepSpeed never unlinks them, so each job
    left 66 MB of RAM per rank in ``/dev/shm`` until the machine restarted. Unlinked, a mapped
    segment stays usable and the kernel frees it when the last rank exits. A collective: call it on
    every rank (only ranks on one node create segments, but every rank waits at the barrier), once
    every rank is known to run DeepSpeed (a peer on another backend would never reach it).
    """
    import torch.distributed as dist

    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    segment = (
        Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{dist.get_rank()}"
    )
    dist.barrier()  # every rank opened every peer's segment inside init_distributed
    segment.unlink(missing_ok=True)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Load a DeepSpeed JSON config, or fail with one sentence naming the file.

    A top-level key DeepSpeed does not read is refused with the nearest one it does: DeepSpeed
    itself ignores it, so a misspelt ``zero_optimisation`` would train with ZeRO off.
    """
    config = read_json(Path(path), what="DeepSpeed config")
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {path} must be a JSON object.")
    known = known_keys()
    for key in config:
        if known and key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f'did you mean "{near[0]}"?' if near else "DeepSpeed would ignore it."
            raise ValueError(f'DeepSpeed config {path} has the unknown key "{key}"; {hint}')
    return config


# Read by DeepSpeed's engine or its launcher rather than by DeepSpeedConfig.
_READ_ELSEWHERE = {
    "optimizer",
    "scheduler",
    "aio",
    "activation_checkpointing",
    "flops_profiler",
    "autotuning",
}


@functools.cache
def known_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed's config model reads, recorded as it parses a minimal config.

    Empty (no check) if this DeepSpeed parses a copy and nothing could be recorded.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return (
        frozenset(seen | _READ_ELSEWHERE)
        if {"zero_optimization", "train_batch_size"} <= seen
        else frozenset()
    )


def resolve_config(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    bf16: bool,
) -> dict[str, Any]:
    """Fill ``"auto"`` and missing batch/precision keys from the run's arguments; refuse conflicts.

    The result is checked with DeepSpeed's own config model. Raises ``ValueError`` (one sentence)
    for a section or value of the wrong type, a value that contradicts the command line, an
    ``optimizer``/``scheduler`` section (the job builds AdamW and its schedule from the command
    line), precision that disagrees with ``--bf16``, fp16 on DeepSpeed's CPU accelerator (it
    supports fp32 and bf16 only), and a ZeRO stage outside 0-3.
    """
    config = json.loads(json.dumps(config))  # a deep copy the caller's dict never sees
    for section, example in (
        ("fp16", '{"enabled": true}'),
        ("bf16", '{"enabled": true}'),
        ("zero_optimization", '{"stage": 2}'),
    ):
        if section in config and not isinstance(config[section], dict):
            raise ValueError(
                f'The DeepSpeed config\'s "{section}" must be an object such as {example}, got {config[section]!r}.'
            )
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(
                f'The DeepSpeed config has an "{section}" section, which the job does not use: it builds '
                "AdamW and its schedule from --learning_rate, --weight_decay and --lr_scheduler_type; remove it."
            )
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
            continue
        if isinstance(given, bool) or not isinstance(given, (int, float)):
            raise ValueError(f'The DeepSpeed config sets {key}={given!r}; it must be a number or "auto".')
        if given != value:
            raise ValueError(
                f"The DeepSpeed config sets {key}={given} but the command line implies {value}; "
                f'set it to "auto" or make them agree.'
            )
    bf16_section = config.setdefault("bf16", {})
    if bf16_section.get("enabled", "auto") == "auto":
        bf16_section["enabled"] = bf16
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    parsed = _parsed(config)
    if parsed.float16_config.enabled and on_cpu():
        raise ValueError(
            "The DeepSpeed config enables fp16, which DeepSpeed's CPU accelerator does not "
            "support; use bf16 or fp32 on CPU."
        )
    if parsed.bfloat16_config.enabled != bf16:
        raise ValueError(
            f"The DeepSpeed config {'enables' if parsed.bfloat16_config.enabled else 'disables'} bf16 but --bf16 was "
            f'{"not " if not bf16 else ""}given; make them agree or set bf16.enabled to "auto".'
        )
    if parsed.float16_config.enabled and bf16:
        raise ValueError("The DeepSpeed config enables fp16 and --bf16 was given; choose one precision.")
    return config


def _parsed(config: dict[str, Any]) -> Any:
    """DeepSpeed's own reading of a config, or one sentence saying what it rejects."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # Checked as one rank: DeepSpeed would compare train_batch_size with this process's world size.
    single = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        return DeepSpeedConfig(single)
    except Exception as err:  # pydantic, type and assertion errors alike
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3]) if first else type(err).__name__
        raise ValueError(f"DeepSpeed rejects the config: {detail}.") from err


def fill_zero3_sizes(config: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Replace ``"auto"`` ZeRO-3 sizes with values derived from the model, in place; returns the config.

    What each size trades (``h`` the hidden size, ``L`` the parameters of the largest decoder
    layer):

    - ``stage3_prefetch_bucket_size`` (``0.9 h^2``, transformers' choice): parameters gathered
      ahead of use; larger overlaps the all-gathers with compute, at that much memory.
    - ``stage3_max_live_parameters`` (``L``): gathered parameters alive at once, prefetch
      included; about one layer, so no rank ever holds more than a layer of the frozen model
      beyond its partition. DeepSpeed's default, 1e9, can keep a whole small model gathered from
      forward to backward.
    - ``stage3_max_reuse_distance`` (``L``): a parameter needed again within this many gathered
      parameters is kept rather than released (recomputation under gradient checkpointing);
      lower saves memory, higher saves all-gathers.
    - ``stage3_param_persistence_threshold`` (``10 h``, transformers' choice): parameters smaller
      than this (norms, biases) stay gathered; it saves tiny all-gathers at their full size.
    - ``reduce_bucket_size`` (``h^2``): gradient elements reduced per bucket (only the blocks have
      gradients here).
    """
    zero = config.get("zero_optimization", {})
    if "auto" not in zero.values():
        return config
    hidden = int(model.config.hidden_size)
    layer = max(count_parameters(m) for m in decoder_layers(model))
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
        "stage3_max_live_parameters": layer,
        "stage3_max_reuse_distance": layer,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return config


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage a (resolved) config asks for."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def partitioned_loading(config: dict[str, Any]) -> Any:
    """Under ZeRO-3, make ``from_pretrained`` build and load the model partitioned.

    Returns transformers' ``HfDeepSpeedConfig``, which transformers holds only by a weak
    reference: keep it alive for as long as models are loaded (``None`` below stage 3).
    """
    if zero_stage(config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


@contextlib.contextmanager
def warmup_engine(model: torch.nn.Module, config: dict[str, Any]) -> Iterator[Callable[[], None] | None]:
    """Forward and backward on a ZeRO-3 partitioned, frozen model, gathered by DeepSpeed's own hooks.

    Yields the clean-up to run after each backward (``None`` below stage 3, where every rank
    holds the whole model and nothing needs gathering). An engine without an optimizer installs
    ZeRO-3's parameter hooks and nothing else; it is destroyed on exit, so the training engine
    built next is the only one.
    """
    if zero_stage(config) != 3:
        yield None
        return
    engine, *_ = deepspeed.initialize(model=model, config=_parameter_only(config, model))
    offload = engine.optimizer  # DeepSpeedZeRoOffload: the hooks that gather and release weights
    try:
        # A layer whose input needs no gradient (the first one) never fires its post-backward
        # release; release those weights after every backward.
        yield offload.release_backward_leftovers
    finally:
        offload.partition_all_parameters()
        engine.destroy()
        # DeepSpeed reuses a module's pre/post-backward functions when it finds them, and they
        # still point at the destroyed engine's hooks; drop them so the next engine makes its own.
        for module in model.modules():
            module.__dict__.pop("pre_bwd_fn", None)
            module.__dict__.pop("post_bwd_fn", None)


def _parameter_only(config: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """What an engine that only gathers parameters needs of a config (which may still hold the
    Trainer's or accelerate's unresolved ``"auto"`` values): ZeRO-3's own settings and precision."""
    zero = {k: v for k, v in config.get("zero_optimization", {}).items() if v != "auto"}
    dtype = next(model.parameters()).dtype
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` for an SMT model: the same arguments, the same four results.

    The config (a dict or a path, as ``config`` or ``config_params``) gets what SMT needs: a
    client optimizer is allowed under ZeRO, and with ``offload_optimizer`` kept rather than
    swapped for ``DeepSpeedCPUAdam``; ``"auto"`` ZeRO-3 sizes are filled from the model. With a
    ``BlockShardedAdamW`` the config must be ZeRO stage 0 without engine-side precision; engine
    clipping is switched off (DeepSpeed would otherwise clip each rank's unaveraged gradient with
    its default of 1.0, and checking the engine afterwards makes sure) and ``max_grad_norm`` on
    the optimizer clips the averaged gradient.
    """
    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    call = bound.arguments
    raw = call.pop("config", None) or call.pop("config_params", None)
    config = _config_dict(raw) if raw is not None else {}
    optimizer, model = call.get("optimizer"), call.get("model")
    if optimizer is not None:  # a client optimizer (or a factory of one)
        config.setdefault("zero_allow_untested_optimizer", True)
        if config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
            config.setdefault("zero_force_ds_cpu_optimizer", False)
    if model is not None and zero_stage(config) == 3:
        fill_zero3_sizes(config, model)
    sharded = isinstance(optimizer, BlockShardedAdamW)
    if sharded:
        _check_sharded_config(config)
        config["gradient_clipping"] = 0.0
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(**call, config=config)
    if sharded:
        if engine.gradient_clipping():
            raise RuntimeError(
                "The DeepSpeed engine clips gradients although BlockShardedAdamW owns clipping."
            )
        # The optimizer reduce-scatters exactly the block gradients in step(); the engine's
        # all-reduce after backward would send them twice.
        engine.enable_backward_allreduce = False
    return engine, optimizer, dataloader, lr_scheduler


def _check_sharded_config(config: dict[str, Any]) -> None:
    problems = []
    if zero_stage(config) != 0:
        problems.append(f"zero_optimization.stage={zero_stage(config)} (ZeRO partitions the blocks itself)")
    if float(config.get("gradient_clipping", 0) or 0) > 0:
        problems.append("gradient_clipping>0 (pass max_grad_norm to BlockShardedAdamW instead)")
    for precision in ("fp16", "bf16"):
        if config.get(precision, {}).get("enabled") is True:
            problems.append(f"{precision} enabled (BlockShardedAdamW keeps fp32 masters of bf16 blocks)")
    if problems:
        raise ValueError("BlockShardedAdamW needs a ZeRO stage 0 config without " + "; ".join(problems) + ".")


def _config_dict(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A deep copy of a config dict, or the config file read."""
    if isinstance(config, (str, os.PathLike)):
        return read_config(config)
    return json.loads(json.dumps(config))


def read_checkpoints_safely(engine: Any) -> None:
    """Make the engine read checkpoint files as data: ``weights_only=True``, DeepSpeed's own types.

    DeepSpeed's checkpoint engine unpickles with ``weights_only=False``, so a file planted in a
    checkpoint could run code on resume. Its files hold tensors, plain containers and the few
    DeepSpeed types below (found by loading what ZeRO 0-3, offload and bf16 runs write); any
    other object is refused with one sentence naming the file.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds objects other than tensors and DeepSpeed's own checkpoint state; "
                "refusing to load it (unpickling it could run code)."
            ) from err
        except FileNotFoundError:  # names the file already
            raise
        # torch.load on a cut file: "[Errno 22] Invalid argument", "PytorchStreamReader failed ..."
        except (RuntimeError, EOFError, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is truncated or not a DeepSpeed checkpoint file ({reason}).") from err

    engine.checkpoint_engine.load = load


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine over ``torch.optim.AdamW`` on the blocks."""

    name = "deepspeed"

    def __init__(self, args: Any, *, meta_model: torch.nn.Module, world_size: int, **kwargs: Any) -> None:
        super().__init__(args, meta_model=meta_model, world_size=world_size, **kwargs)
        self.user_config = read_config(args.deepspeed)
        self.config = self._resolve(world_size, meta_model)
        if self.quantization is not None and self.zero_stage == 3:
            raise ValueError(
                f"A quantized base ({self.quantization.describe()}) cannot be partitioned by ZeRO-3 (its packed "
                "weights do not survive zero.Init); use ZeRO-1/2 (configs/zero2_smt.json) or "
                "--backend torch, where each rank holds the whole quantized base."
            )
        self.world_size, self.meta_model = world_size, meta_model
        self._partitioned_loading = None  # kept alive: transformers holds it by a weak reference

    def _resolve(self, world_size: int, meta_model: torch.nn.Module) -> dict[str, Any]:
        config = resolve_config(
            self.user_config,
            micro_batch_size=self.args.per_device_train_batch_size,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            world_size=world_size,
            max_grad_norm=self.args.max_grad_norm,
            bf16=self.args.bf16,
        )
        return fill_zero3_sizes(config, meta_model)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.config)

    def init_process_group(self) -> None:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.device)
        init_distributed()
        if dist.get_world_size() != self.world_size:  # a launcher that announced none (plain mpirun)
            self.config = self._resolve(dist.get_world_size(), self.meta_model)

    def after_agreement(self) -> None:
        if on_cpu():
            release_shared_memory()

    def checkpoint_layout(self) -> dict[str, Any]:
        """DeepSpeed's checkpoint files are per ZeRO stage and per rank."""
        return {**super().checkpoint_layout(), "zero_stage": self.zero_stage}

    def load_base(self) -> None:
        if self.zero_stage == 3:
            from transformers import AutoModelForCausalLM

            self._partitioned_loading = partitioned_loading(self.config)
            model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, dtype=self.dtype)
            model.train()
        else:
            model = load_pretrained(
                self.args.model_dir, dtype=self.dtype, device=self.device, quantization=self.quantization
            )
        self.module = self.configure_model(model)

    @contextlib.contextmanager
    def warmup(self) -> Iterator[Callable[[], None] | None]:
        with warmup_engine(self.module, self.config) as after_backward:
            yield after_backward

    def build(self, selection: BlockSelection, *, lr_lambda) -> None:
        if self.module is None:
            self.load_base()
        apply_smt(
            self.module, selection, self.smt_config, blocks_dtype=self.dtype if self.quantization else None
        )
        optimizer = torch.optim.AdamW(
            self.blocks, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.engine, _, _, self.scheduler = initialize(
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

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()  # None where the engine computed none
        return None if norm is None else float(norm)

    def save(self, directory: Path) -> None:
        """Engine state without the frozen weights (a collective call)."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        read_checkpoints_safely(self.engine)
        load_path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=ENGINE_TAG,
            load_module_strict=False,  # frozen weights were left out on purpose
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"{directory} holds no DeepSpeed engine state under '{ENGINE_TAG}'.")
