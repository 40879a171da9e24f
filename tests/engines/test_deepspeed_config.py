"""DeepSpeed config resolution: "auto" filled from the command line, conflicts refused."""

from __future__ import annotations

import json

import pytest

from smt_dist.engines.deepspeed import known_keys, read_config, resolve_config, zero_stage

RUN = dict(micro_batch_size=4, gradient_accumulation_steps=2, world_size=2, max_grad_norm=1.0, bf16=False)


@pytest.mark.parametrize("name", ["zero2_smt", "zero3_smt", "zero3_offload_smt"])
def test_shipped_configs_resolve(name):
    config = resolve_config(read_config(f"configs/{name}.json"), **RUN)
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2 and config["bf16"]["enabled"] is False
    assert zero_stage(config) == (2 if name == "zero2_smt" else 3)
    assert config["zero_allow_untested_optimizer"] is True
    if "offload" in name:
        assert config["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            "sets train_micro_batch_size_per_gpu=8 but the command line implies 4",
        ),
        ({"fp16": {"enabled": True}}, "enables fp16, which DeepSpeed's CPU accelerator does not support"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ],
)
def test_incompatible_configs_are_refused(config, message):
    original = json.dumps(config)
    with pytest.raises(ValueError, match=message):
        resolve_config(config, **RUN)
    assert json.dumps(config) == original  # the caller's dict is never modified


def test_unreadable_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="DeepSpeed config .*missing.json does not exist"):
        read_config(tmp_path / "missing.json")
    with pytest.raises(
        IsADirectoryError, match=f"DeepSpeed config {tmp_path} is a directory, not a JSON file"
    ):
        read_config(tmp_path)
    (tmp_path / "bad.json").write_text('{"zero_optimization": }')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(line 1"):
        read_config(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("zero_optimisation", 'did you mean "zero_optimization"?'),
        ("gradient_clip", 'did you mean "gradient_clipping"?'),
        ("my_own_setting", "DeepSpeed would ignore it."),
    ],
)
def test_unknown_top_level_keys_are_refused_with_the_nearest_known_one(tmp_path, key, hint):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({key: {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ValueError) as refused:
        read_config(path)
    assert str(refused.value) == f'DeepSpeed config {path} has the unknown key "{key}"; {hint}'


def test_the_known_keys_come_from_deepspeed_itself():
    """Recorded from DeepSpeed's own parsing; an empty record would silently switch the check off."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    keys = known_keys()
    assert {ZERO_OPTIMIZATION, constants.TRAIN_BATCH_SIZE, constants.GRADIENT_CLIPPING} <= keys
    assert {constants.OPTIMIZER, constants.SCHEDULER} <= keys  # read by the engine, refused later by us
