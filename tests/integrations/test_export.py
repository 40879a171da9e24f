"""Saving code written for plain models keeps SMT's training (smt_dist.integrations.merge_on_save), in one process.

The reference for "fine-tuned" is ``merge_smt`` on a copy of the trained model: plain
``nn.Linear`` layers holding ``W + D``. The launched pipelines are in test_examples.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from safetensors.torch import save_file

from smt_dist import SMTConfig, apply_smt, merge_smt, select_blocks
from smt_dist.core.layer import MERGED_FLAG
from smt_dist.core.surgery import smt_modules
from smt_dist.integrations.merge_on_save import save_merged


def trained_smt_model():
    model = tiny_causal_lm("llama")
    config = SMTConfig(block_size=16, num_blocks=6)
    generator = torch.Generator().manual_seed(1)
    scores = {
        name: torch.rand(module.out_features // 16, module.in_features // 16, generator=generator)
        for name, module in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    }
    apply_smt(model, select_blocks(scores, config), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_merged(model)


def test_a_state_dict_walk_saves_merged_weights_and_loads_back_exactly(tmp_path):
    model = trained_smt_model()
    want = merge_smt(copy.deepcopy(model)).state_dict()
    # DeepSpeed-Chat's save_hf_format: state_dict(), drop adapter keys it knows (not ours), save.
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # ignores the blocks/index/flag keys
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)
    # the same dict loads back into an SMT model (a resume): the blocks come out of the weight again
    fresh = trained_smt_model()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    fresh.load_state_dict(state)
    for (name, got), (_, expected) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(got, expected), name  # bit for bit: the base is recognised, not recomputed
    # into a model whose base differs (or is not loaded yet) the blocks are subtracted: W + D - D
    # is W up to one fp32 rounding of the sum
    other = trained_smt_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(state)
    for got, expected in zip(other.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_save_pretrained_writes_a_plain_checkpoint(tmp_path):
    model = trained_smt_model()
    want = merge_smt(copy.deepcopy(model)).state_dict()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith(("blocks", "block_index", MERGED_FLAG)) for k in keys)
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


def test_save_pretrained_refuses_partitioned_weights_without_a_gathered_state_dict(tmp_path):
    model = trained_smt_model()
    module = next(iter(smt_modules(model).values()))
    module.weight.ds_tensor = torch.empty(0)  # how ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="partitioned"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
