"""``SMTPeftConfig``: SMT's options as a peft config, with the selected blocks as data.

LoRA's config knows every shape from ``r``; SMT's shapes are the selected blocks, which only the
warm-up knows. So the config holds them: ``block_pattern`` maps each module to its blocks'
coordinates (as LoRA's ``rank_pattern`` maps modules to ranks), filled by ``preprocess_smt`` and
saved in ``adapter_config.json``, so ``PeftModel.from_pretrained`` builds the adapter's layers
before any weight is read. ``base_fingerprint`` records a few base weights, so an adapter loaded
on another base is refused instead of adding its deltas to the wrong weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig

from smt_dist.core.config import SMTConfig
from smt_dist.core.layer import SparseLinear
from smt_dist.core.selection import BlockSelection

PEFT_TYPE = "SMT"
"""The name peft knows the method by (``peft_type`` in ``adapter_config.json``)."""

_SMT_FIELDS = (
    "block_size",
    "target_modules",
    "score",
    "num_blocks",
    "ratio",
    "warmup_steps",
    "max_attention_fraction",
    "max_mlp_fraction",
    "max_blocks_per_row",
)


@dataclass
class SMTPeftConfig(PeftConfig):
    """Sparse Matrix Tuning for peft: train the ``block_size`` x ``block_size`` blocks the warm-up
    picks. The options mean what they mean in ``smt_dist.SMTConfig``."""

    block_size: int = field(default=256, metadata={"help": "Side of the square blocks (paper: 256)."})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Linears that may get blocks (names or fnmatch patterns)."},
    )
    score: str = field(default="mean_abs", metadata={"help": "mean_abs (the paper) or abs_mean."})
    num_blocks: int | None = field(default=None, metadata={"help": "Budget as a block count."})
    ratio: float | None = field(default=None, metadata={"help": "Budget as a fraction of all parameters."})
    warmup_steps: int = field(default=10, metadata={"help": "Warm-up micro-batches."})
    max_attention_fraction: float | None = field(default=None, metadata={"help": "Cap on attention blocks."})
    max_mlp_fraction: float | None = field(default=None, metadata={"help": "Cap on MLP blocks."})
    max_blocks_per_row: int | None = field(default=None, metadata={"help": "Cap per row-block of a module."})
    block_pattern: dict[str, list[list[int]]] = field(
        default_factory=dict,
        metadata={"help": "Module name to [row-block, column-block] pairs; filled by preprocess_smt."},
    )
    base_fingerprint: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "A few base weights, to refuse another base."}
    )
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, set):  # peft may hand back a set
            self.target_modules = sorted(self.target_modules)
        self.smt_config()  # every option checked now, with SMTConfig's sentences
        self.block_pattern = {
            name: [list(map(int, pair)) for pair in index] for name, index in self.block_pattern.items()
        }

    def smt_config(self) -> SMTConfig:
        """The same options as an ``SMTConfig`` (what the warm-up and selection read)."""
        return SMTConfig(**{name: getattr(self, name) for name in _SMT_FIELDS})

    def selection(self) -> BlockSelection:
        """The selected blocks, in ``SparseLinear``'s order; ``ValueError`` when none are set."""
        if not self.block_pattern:
            raise ValueError(
                "This SMTPeftConfig selects no blocks yet; run smt_dist.peft.preprocess_smt(model, "
                "config, batches) before get_peft_model (or load a saved SMT adapter)."
            )
        return BlockSelection(
            block_size=self.block_size,
            blocks={
                name: torch.tensor(index, dtype=torch.int64) for name, index in self.block_pattern.items()
            },
        )

    def set_selection(self, selection: BlockSelection) -> None:
        """Record a selection as ``block_pattern`` (column-major, ``SparseLinear``'s order)."""
        if selection.block_size != self.block_size:
            raise ValueError(
                f"The selection uses block size {selection.block_size} but the config says {self.block_size}."
            )
        self.block_pattern = {name: index.tolist() for name, index in selection.blocks.items()}

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Every module of ``block_pattern`` exists (``shapes``: name to weight shape) and every
        block lies in its grid; one ``ValueError`` sentence otherwise."""
        for name, index in self.block_pattern.items():
            if name not in shapes:
                raise ValueError(f"The SMT adapter selects blocks of '{name}', which this model lacks.")
            SparseLinear.check_index(
                torch.tensor(index).reshape(-1, 2), shapes[name], self.block_size, name=name
            )
