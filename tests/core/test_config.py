"""SMTConfig rejects bad values with the field name, the value and what is valid."""

from __future__ import annotations

import pytest

from smt_dist import SMTConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_blocks=0), "num_blocks must be a positive integer, got 0"),
        (dict(num_blocks=4, ratio=0.1), "Set exactly one budget"),
        (dict(), "Set exactly one budget"),
        (dict(ratio=1.5), r"ratio must be in \(0, 1\], got 1.5"),
        (dict(num_blocks=4, block_size=0), "block_size must be a positive integer, got 0"),
        (dict(num_blocks=4, score="max"), "score must be one of mean_abs, abs_mean, got 'max'"),
        (dict(num_blocks=4, warmup_steps=0), "warmup_steps must be a positive integer, got 0"),
        (dict(num_blocks=4, target_modules=()), "target_modules must be a non-empty list"),
        (dict(num_blocks=4, max_mlp_fraction=0.0), r"max_mlp_fraction must be in \(0, 1\]"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SMTConfig(**kwargs)


def test_round_trips_through_a_dict_and_accepts_comma_lists():
    config = SMTConfig(num_blocks=3, target_modules="q_proj, v_proj", block_size=32)
    assert config.target_modules == ("q_proj", "v_proj")
    assert SMTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown SMT config keys: colour"):
        SMTConfig.from_dict({**config.to_dict(), "colour": "red"})
