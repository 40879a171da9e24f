"""Typed, validated configuration for Sparse Matrix Tuning.

One dataclass holds every choice the method makes (block size, which linears, how blocks are
scored, how many are kept), so a run, an adapter file and a test all describe SMT the same way.
Bad values fail here, early, with the field name and what would be valid.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

SCORES = ("mean_abs", "abs_mean")


@dataclass
class SMTConfig:
    """What to tune and how to choose it."""

    block_size: int = 256
    """Side ``l`` of the square ``l x l`` blocks that weights are cut into (paper: 256)."""

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module-name patterns (``fnmatch``) matched against a linear's last name component or its
    full dotted name; every ``nn.Linear`` that matches is a candidate for blocks."""

    score: str = "mean_abs"
    """``mean_abs``: the paper's sum over warm-up micro-batches of mean ``|G|`` per block.
    ``abs_mean``: ``|sum of mean G|`` per block, what the authors' released code computes."""

    num_blocks: int | None = None
    """Budget as a number of blocks. Exactly one of ``num_blocks`` and ``ratio`` is set."""

    ratio: float | None = None
    """Budget as a fraction of the model's total parameters (the paper's "#Params%" / 100)."""

    warmup_steps: int = 10
    """Micro-batches of forward and backward used to score blocks before selection."""

    max_attention_fraction: float | None = None
    """Optional cap: at most this fraction of the budget goes to attention modules."""

    max_mlp_fraction: float | None = None
    """Optional cap: at most this fraction of the budget goes to MLP modules."""

    max_blocks_per_row: int | None = None
    """Optional cap: at most this many blocks in any one row-block of any one module. Not the
    paper's; the global top-k otherwise fills a few output rows (docs/quality.md)."""

    attention_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Patterns that put a target in the attention group (for caps and summaries)."""

    mlp_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    """Patterns that put a target in the MLP group (for caps and summaries)."""

    shared_input_groups: tuple[tuple[str, ...], ...] = (
        ("q_proj", "k_proj", "v_proj"),
        ("gate_proj", "up_proj"),
    )
    """Sibling linears (same parent module, last name component matching one group) that read one
    input tensor: when together they would copy at least the whole input, they keep it once, by
    reference, instead (memory only; the result never depends on it)."""

    def __post_init__(self) -> None:
        self.target_modules = _as_patterns("target_modules", self.target_modules)
        self.attention_modules = _as_patterns("attention_modules", self.attention_modules)
        self.mlp_modules = _as_patterns("mlp_modules", self.mlp_modules)
        groups = self.shared_input_groups
        if isinstance(groups, str) or not all(
            not isinstance(g, str) and all(isinstance(p, str) and p for p in g) for g in groups
        ):
            raise ValueError(f"shared_input_groups must be lists of module-name patterns, got {groups!r}.")
        self.shared_input_groups = tuple(tuple(g) for g in groups)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}.")
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size}.")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}.")
        if (self.num_blocks is None) == (self.ratio is None):
            raise ValueError(
                "Set exactly one budget: num_blocks (a block count) or ratio (a fraction of the "
                f"model's parameters); got num_blocks={self.num_blocks!r}, ratio={self.ratio!r}."
            )
        if self.num_blocks is not None and (
            isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1
        ):
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}.")
        if self.ratio is not None and not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ValueError(f"warmup_steps must be a positive integer, got {self.warmup_steps!r}.")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive integer, got {self.warmup_steps}.")
        cap = self.max_blocks_per_row
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_blocks_per_row must be a positive integer or None, got {cap!r}.")
        for name in ("max_attention_fraction", "max_mlp_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] or None, got {value!r}.")

    @classmethod
    def authors_recipe(cls, *, attention_blocks: int, mlp_blocks: int, **overrides: Any) -> SMTConfig:
        """The selection recipe of the paper's released code, as far as a frozen warm-up allows.

        Their defaults: 256 x 256 blocks of q, k, v and the MLP projections (never o), scored by
        the absolute value of the block's mean summed gradient (their ``mean_abs``, our
        ``abs_mean``), over 100 warm-up micro-batches, with separate budgets for attention and MLP
        blocks (``num_submatrix_attn``, ``num_submatrix_mlp``). The budgets become a total and two
        caps, which select exactly those counts when each group has that many blocks. Their
        warm-up fine-tunes every weight while it scores; ours keeps the base frozen
        (docs/fidelity.md).
        """
        total = attention_blocks + mlp_blocks
        if attention_blocks < 0 or mlp_blocks < 0 or total < 1:
            raise ValueError("authors_recipe needs non-negative block counts with a positive total.")
        attention, mlp = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
        both = attention_blocks > 0 and mlp_blocks > 0  # a zero budget drops its group's targets
        recipe: dict[str, Any] = {
            "block_size": 256,
            "target_modules": (attention if attention_blocks else ()) + (mlp if mlp_blocks else ()),
            "score": "abs_mean",
            "num_blocks": total,
            "warmup_steps": 100,
            "max_attention_fraction": attention_blocks / total if both else None,
            "max_mlp_fraction": mlp_blocks / total if both else None,
        }
        return cls(**{**recipe, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        out = dataclasses.asdict(self)
        for key in ("target_modules", "attention_modules", "mlp_modules"):
            out[key] = list(out[key])
        out["shared_input_groups"] = [list(group) for group in self.shared_input_groups]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SMTConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        data = {k: v for k, v in data.items() if k != "extra"}  # a free-form field of older adapters
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SMT config keys: {', '.join(unknown)}.")
        return cls(**data)


def _as_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = tuple(p.strip() for p in value.split(",") if p.strip())
    patterns = tuple(value)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must be a non-empty list of module-name patterns, got {value!r}.")
    return patterns


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True when a module's last name component or full dotted name matches a pattern."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(name, p) for p in patterns)
