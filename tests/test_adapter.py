"""Adapter files: round trip, wrong base, damaged files, and writes that destroy nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from safetensors.torch import save_file

import smt_dist.adapter as adapter_module
from smt_dist import (
    SMTConfig,
    apply_smt,
    collect_block_scores,
    load_smt_adapter,
    save_smt_adapter,
    select_blocks,
)


@pytest.fixture
def saved(tmp_path):
    config = SMTConfig(block_size=16, num_blocks=6, warmup_steps=2)
    model = tiny_causal_lm("llama")
    apply_smt(model, select_blocks(collect_block_scores(model, lm_batches(2), config), config), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    path = save_smt_adapter(model, tmp_path / "adapter")
    return model, path


def test_round_trip_onto_base_in_bf16(saved):
    model, path = saved
    reloaded = load_smt_adapter(tiny_causal_lm("llama").to(torch.bfloat16), path)
    original = dict(model.named_parameters())
    for name, param in reloaded.named_parameters():
        if name.endswith(".blocks"):
            torch.testing.assert_close(param.float(), original[name], rtol=1e-2, atol=1e-2)


def test_onto_other_weights_is_refused(saved):
    _, path = saved
    with pytest.raises(ValueError, match="was trained on another base: the weights of 'model.layers"):
        load_smt_adapter(tiny_causal_lm("llama", seed=1), path)


def test_onto_other_shapes_is_refused(saved):
    _, path = saved
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
    )
    with pytest.raises(
        ValueError,
        match=r"was trained on another base: '.*' is \(\d+, 32\) here but \(\d+, 64\) in the adapter",
    ):
        load_smt_adapter(other, path)


def test_missing_and_truncated_files_are_clear_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="No SMT adapter at .*nowhere: smt_adapter.json is missing"):
        load_smt_adapter(tiny_causal_lm(), tmp_path / "nowhere")
    weights = path / adapter_module.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is truncated or not a safetensors file"):
        load_smt_adapter(tiny_causal_lm(), path)


def test_wrong_tensor_shapes_are_a_clear_error(saved):
    _, path = saved
    meta = json.loads((path / adapter_module.CONFIG_NAME).read_text())
    name = next(iter(meta["modules"]))
    count = meta["modules"][name]["num_blocks"]
    save_file(
        {
            f"{name}.blocks": torch.zeros(count, 8, 8),
            f"{name}.block_index": torch.zeros(count, 2, dtype=torch.long),
        },
        str(path / adapter_module.WEIGHTS_NAME),
    )
    with pytest.raises(ValueError, match=f"wrong shapes for '{name}': blocks \\({count}, 8, 8\\)"):
        load_smt_adapter(tiny_causal_lm(), path)


def test_failed_save_leaves_the_old_adapter_intact(saved, monkeypatch):
    model, path = saved
    before = {f.name: f.read_bytes() for f in path.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_module, "save_file", broken_save)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_smt_adapter(model, path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]  # no staging debris


def test_overwrite_replaces_whole_directory(saved):
    model, path = saved
    (path / "stale.txt").write_text("from an older save")
    save_smt_adapter(model, path)
    assert sorted(f.name for f in path.iterdir()) == sorted(
        [adapter_module.WEIGHTS_NAME, adapter_module.CONFIG_NAME]
    )
