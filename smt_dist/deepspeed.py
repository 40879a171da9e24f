"""DeepSpeed integration: the only module that imports ``deepspeed``.

SMT's block parameters are the model's only trainable parameters, so a DeepSpeed engine
partitions just them and their Adam states (ZeRO-1/2), reduces just their gradients, and under
ZeRO-3 also partitions the frozen base. This module turns a user's DeepSpeed JSON into one that
fits the run (``"auto"`` values filled from the command line, conflicts refused with one
sentence), loads a model partitioned as it is read (ZeRO-3), warms it up under the engine's own
gathering, builds the training engine, and gathers ZeRO-3 parameters when a full value is needed.

Swapping SMT into an existing DeepSpeed script takes two changed lines::

    model = smt_dist.deepspeed.prepare(model, warmup_batches, SMTConfig(...), config=ds_config)
    engine, optimizer, _, scheduler = smt_dist.deepspeed.initialize(model=model, ..., config=ds_config)

with either a client ``torch.optim.AdamW`` over the blocks (ZeRO 1-3 partition them) or, at
ZeRO stage 0, ``BlockShardedAdamW``, which then owns the gradient exchange: the engine's own
all-reduce is switched off, as DeepSpeed's 1-bit Adam does.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

# DeepSpeed picks its accelerator on first import; on a machine without CUDA say so explicitly,
# so a CPU run never probes for GPUs (and works where the env var was forgotten).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from deepspeed.accelerator import get_accelerator

from smt_dist.config import SMTConfig
from smt_dist.model import apply_smt, decoder_layers
from smt_dist.optim import BlockShardedAdamW
from smt_dist.pipeline import choose_blocks


def on_cpu() -> bool:
    """True when DeepSpeed runs on its CPU accelerator."""
    return get_accelerator().device_name() == "cpu"


def init_distributed() -> None:
    """Join the job's process group (env vars from deepspeed/torchrun, or mpi4py under mpirun)."""
    # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT itself; keep one the user chose.
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl", distributed_port=port)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Load a DeepSpeed JSON config, or fail with one sentence naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"DeepSpeed config {path} is not valid JSON (line {err.lineno}: {err.msg})."
        ) from err
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {path} must be a JSON object.")
    return config


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
    layer = max(sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for m in decoder_layers(model))
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


def prepare(
    model: torch.nn.Module,
    warmup_batches: Iterable[Any],
    smt_config: SMTConfig,
    *,
    config: dict[str, Any] | str | os.PathLike | None = None,
    loss_fn: Any = None,
    merge_on_save: bool = True,
) -> torch.nn.Module:
    """Warm up, select the blocks (checked identical on every rank) and convert the model.

    Call on every rank before ``initialize`` (or before the Trainer or accelerate builds its
    engine); returns the same model with only its blocks trainable. A model partitioned at load
    by ZeRO-3 is warmed up under DeepSpeed's own gathering; ``config`` is the DeepSpeed config, by
    default the one transformers loaded the model with (``HfDeepSpeedConfig``, which the Trainer
    and accelerate create).

    A ``config`` dict is changed in place (its ``"auto"`` ZeRO-3 sizes filled), so the engine built
    from it later sees the same sizes. ``merge_on_save`` keeps a pipeline's own saving right: the model's ``state_dict()`` and
    ``save_pretrained`` then write each trained weight as ``W + D`` under its usual name, which
    ``from_pretrained`` loads as the fine-tuned model (see ``smt_dist.export``).
    """
    from torch.distributed.tensor import DTensor

    from smt_dist.export import save_merged

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "The model is already sharded by FSDP2; call prepare before fully_shard (or use "
            "launch/train.py --backend fsdp, which builds SMT layers before sharding)."
        )
    # A dict is filled in place: it may be the one the Trainer or accelerate will build the engine from.
    if isinstance(config, (str, os.PathLike)):
        ds_config = read_config(config)
    else:
        ds_config = config if config is not None else (_transformers_config() or {})
    if zero_stage(ds_config) == 3:
        fill_zero3_sizes(ds_config, model)
    with warmup_engine(model, ds_config) as after_backward:
        selection, _ = choose_blocks(
            model, warmup_batches, smt_config, loss_fn=loss_fn, after_backward=after_backward
        )
    apply_smt(model, selection, smt_config)
    if merge_on_save:
        save_merged(model)
    return model


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


def _transformers_config() -> dict[str, Any] | None:
    """The DeepSpeed config transformers loads models under (``HfDeepSpeedConfig``), if any."""
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config()


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

    engine.checkpoint_engine.load = load


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned parameters inside the block (a collective call)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
