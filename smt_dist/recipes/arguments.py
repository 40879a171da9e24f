"""Command-line options of ``launch/train.py``, in Hugging Face's names, validated up front.

Every option can also come from a JSON or YAML file (``--config_file``); options given on the
command line win. Validation happens before any process group, model or output exists, so bad
input costs nothing and writes nothing.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser

from smt_dist.core.config import SCORES, SMTConfig
from smt_dist.engines import BACKENDS
from smt_dist.files.jsonfile import read_json
from smt_dist.files.quantization import Quantization, quantization_from_options
from smt_dist.recipes.formats import FORMATS
from smt_dist.recipes.reporting import parse_report_to

# The embedded defaults, relative to the working directory (a checkout of the repository): an
# installed package carries no model, and a path inside it would point nowhere.
DEFAULT_MODEL = Path("models") / "tiny-llama"
DEFAULT_DATA = Path("data") / "tiny_instruct.jsonl"


@dataclass
class TrainArguments:
    """Everything the training job needs to know."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local model directory with safetensors weights (no hub at run time). "
            "Default: the embedded tiny Llama."
        },
    )
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "A .json, .jsonl, .parquet or .csv file, a directory of them, or a hub dataset name. "
            "Default: the embedded dataset."
        },
    )
    dataset_split: str = field(
        default="train", metadata={"help": "The split to read when --data_path is a hub dataset name."}
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes that tokenise (once per node; the result is cached and shared)."},
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": f"auto (read from the first record), {', '.join(FORMATS)}."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "A Jinja chat template file for conversations (default: the tokenizer's own)."},
    )
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Conversations: the loss on the assistant's turns only."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Lay examples end to end into rows of max_seq_length (no attention across them)."},
    )
    output_dir: str = field(
        default="runs/smt", metadata={"help": "Where logs, checkpoints and the adapter go."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a previous run's output."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch size per rank."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    learning_rate: float = field(default=5e-3, metadata={"help": "Peak learning rate of the blocks."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (decays the block deltas)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (0: off)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear, cosine or constant."})
    warmup_steps: int = field(
        default=0, metadata={"help": "Learning-rate warm-up steps (not the SMT warm-up)."}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is not set."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    seed: int = field(default=42, metadata={"help": "Seed of the data order and dropout."})
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 (blocks, activations)."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each decoder layer in backward (non-reentrant) instead of keeping activations."
        },
    )
    save_steps: int = field(
        default=0, metadata={"help": "Checkpoint every this many steps (0: only at the end)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint directory, or 'latest' for the newest in output_dir."}
    )
    logging_steps: int = field(default=1, metadata={"help": "Write a log line every this many steps."})
    report_to: str = field(
        default="none",
        metadata={
            "help": "none, or a comma-separated list of tensorboard, wandb, mlflow (all work offline; "
            "train_log.jsonl is always written)."
        },
    )
    run_name: str | None = field(
        default=None,
        metadata={"help": "The run's name in TensorBoard, W&B and MLflow (default: a timestamp)."},
    )
    val_set_size: int = field(
        default=0,
        metadata={"help": "Hold this many training records out (seeded) and report their loss."},
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "A data file (same format) whose loss is reported (instead of --val_set_size)."},
    )
    eval_steps: int = field(
        default=0, metadata={"help": "Validation loss every this many steps (0: only at the end)."}
    )
    merge: bool = field(default=False, metadata={"help": "Also write a merged Hugging Face checkpoint."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    report_memory: bool = field(
        default=False,
        metadata={"help": "Write memory.json: every rank's peak memory per phase (anonymous RSS, CUDA)."},
    )
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config."})
    backend: str = field(
        default="auto",
        metadata={
            "help": "deepspeed, torch (BlockShardedAdamW), fsdp (FSDP2) or auto: deepspeed with --deepspeed, "
            "fsdp under `accelerate launch` with an FSDP config, else torch."
        },
    )
    fsdp_cpu_offload: bool = field(
        default=False, metadata={"help": "FSDP2: keep sharded parameters in host memory."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Load the frozen base in 4 bits (bitsandbytes, QLoRA's base); the blocks stay float."
        },
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "With --load_in_4bit: nf4 or fp4."})
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={"help": "With --load_in_4bit: float32, bfloat16 or float16 (default: the job's dtype)."},
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "With --load_in_4bit: quantize the quantization scales too."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the frozen base in 8 bits (bitsandbytes LLM.int8)."}
    )
    torchao: str | None = field(
        default=None,
        metadata={"help": "int8: load the frozen base with torchao's int8 weight-only quantization."},
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher."})
    smt_block_size: int = field(default=16, metadata={"help": "Block side l (paper: 256)."})
    smt_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated module-name patterns."}
    )
    smt_num_blocks: int | None = field(default=None, metadata={"help": "Budget in blocks."})
    smt_ratio: float | None = field(
        default=None, metadata={"help": "Budget as a fraction of all parameters."}
    )
    smt_score: str = field(default="mean_abs", metadata={"help": f"Block score: {', '.join(SCORES)}."})
    smt_max_blocks_per_row: int | None = field(
        default=None,
        metadata={
            "help": "At most this many blocks per row-block of a module (not the paper's; docs/quality.md)."
        },
    )
    smt_warmup_steps: int = field(default=8, metadata={"help": "Warm-up micro-batches for block scores."})
    smt_selection: str | None = field(
        default=None,
        metadata={"help": "A selection.json from an earlier run: train those blocks and skip the warm-up."},
    )

    def __post_init__(self) -> None:
        if self.smt_num_blocks is not None and self.smt_ratio is not None:
            raise ValueError("Give --smt_num_blocks or --smt_ratio, not both.")
        if self.smt_num_blocks is None and self.smt_ratio is None:
            self.smt_ratio = 0.02
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "num_train_epochs", "smt_ratio"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"--weight_decay and --max_grad_norm must be >= 0, got {self.weight_decay} and {self.max_grad_norm}."
            )
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"--dataset_num_proc must be at least 1, got {self.dataset_num_proc}.")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.dataset_format not in ("auto", *FORMATS):
            raise ValueError(
                f"--dataset_format must be auto or one of {', '.join(FORMATS)}, got {self.dataset_format!r}."
            )
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ValueError(
                f"--lr_scheduler_type must be linear, cosine or constant, got {self.lr_scheduler_type!r}."
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set --max_steps or a positive --num_train_epochs.")
        if self.val_set_size < 0 or self.eval_steps < 0:
            raise ValueError("--val_set_size and --eval_steps must be >= 0.")
        if self.val_set_size and self.eval_data_path:
            raise ValueError("Give --val_set_size or --eval_data_path, not both.")
        if self.save_steps < 0 or self.save_total_limit < 1:
            raise ValueError("--save_steps must be >= 0 and --save_total_limit >= 1.")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.backend == "auto":
            self.backend = _auto_backend(self)
        if (self.backend == "deepspeed") != bool(self.deepspeed):
            raise ValueError("--backend deepspeed and --deepspeed CONFIG go together; give both or neither.")
        parse_report_to(self.report_to)  # each tool named and installed
        self.smt_config()  # raises ValueError naming the field for a bad SMT option
        self.quantization()  # one way of quantizing, its library installed

    def quantization(self) -> Quantization | None:
        """How the frozen base is quantized as it loads (``None``: not at all)."""
        return quantization_from_options(
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            torchao=self.torchao,
            quant_type=self.bnb_4bit_quant_type,
            compute_dtype=self.bnb_4bit_compute_dtype,
            double_quant=self.bnb_4bit_use_double_quant,
        )

    def smt_config(self) -> SMTConfig:
        """The SMT part of the arguments as a validated config."""
        return SMTConfig(
            block_size=self.smt_block_size,
            target_modules=self.smt_target_modules,
            score=self.smt_score,
            num_blocks=self.smt_num_blocks,
            ratio=self.smt_ratio if self.smt_num_blocks is None else None,
            warmup_steps=self.smt_warmup_steps,
            max_blocks_per_row=self.smt_max_blocks_per_row,
        )

    @property
    def model_dir(self) -> Path:
        """The model directory: the user's, or the embedded tiny Llama."""
        return Path(self.model_name_or_path) if self.model_name_or_path else DEFAULT_MODEL

    @property
    def data_file(self) -> Path:
        """The training data file."""
        return Path(self.data_path) if self.data_path else DEFAULT_DATA

    def to_dict(self) -> dict:
        """Plain values for logs and checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _auto_backend(args: TrainArguments) -> str:
    if args.deepspeed:
        return "deepspeed"
    # `accelerate launch` with an FSDP config announces it in the environment.
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true":
            args.fsdp_cpu_offload = True
        return "fsdp"
    return "torch"


class _Parser(HfArgumentParser):
    """argparse that raises one ``ValueError`` sentence instead of printing usage and exiting."""

    def error(self, message: str):
        raise ValueError(f"{message[0].upper()}{message[1:]}; see --help.")


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    """Parse the command line, merged over ``--config_file`` (JSON or YAML) when given.

    Options from the file are parsed exactly as if typed first on the command line (same types,
    same checks); options typed on the command line come after them and win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(TrainArguments)
    parser.add_argument("--config_file", default=None, help="JSON or YAML file of the same options.")
    config_files = [
        i for i, arg in enumerate(argv) if arg == "--config_file" or arg.startswith("--config_file=")
    ]
    if len(config_files) > 1:
        raise ValueError("--config_file was given more than once.")
    if config_files:
        position = config_files[0]
        if "=" in argv[position]:
            path, used = argv[position].split("=", 1)[1], 1
        elif position + 1 < len(argv):
            path, used = argv[position + 1], 2
        else:
            raise ValueError("--config_file needs a path.")
        options = _read_options(Path(path))
        del argv[position : position + used]
        known = {f.name for f in fields(TrainArguments)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"Unknown options in the config file {path}: {', '.join(unknown)}.")
        argv = [
            token for key, value in options.items() if value is not None for token in (f"--{key}", str(value))
        ] + argv
    # The second value is the namespace holding --config_file, already consumed above.
    args, _ = parser.parse_args_into_dataclasses(args=argv)
    return args


def _read_options(path: Path) -> dict:
    if path.suffix not in (".yaml", ".yml"):
        options = read_json(path, what="Config file")
    elif not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    else:
        import yaml

        try:
            options = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"Config file {path} is not UTF-8 text.") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ValueError(f"Config file {path} is not valid YAML{where}.") from err
    if not isinstance(options, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option names to values.")
    return options
