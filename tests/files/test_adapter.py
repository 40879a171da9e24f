"""Adapter files: round trip, wrong base, damaged files, and writes that destroy nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from safetensors.torch import save_file

import smt_dist.files.adapter as adapter_module
from smt_dist import (
    SMTConfig,
    apply_smt,
    collect_block_scores,
    load_smt_adapter,
    save_smt_adapter,
    select_blocks,
)

CONFIG = SMTConfig(block_size=16, num_blocks=6, warmup_steps=2)


@pytest.fixture
def saved(tmp_path):
    model = tiny_causal_lm("llama")
    apply_smt(model, select_blocks(collect_block_scores(model, lm_batches(2), CONFIG), CONFIG), CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    path = save_smt_adapter(model, tmp_path / "adapter", config=CONFIG)
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
        save_smt_adapter(model, path, config=CONFIG)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]  # no staging debris


def test_overwrite_replaces_whole_directory(saved):
    model, path = saved
    (path / "stale.txt").write_text("from an older save")
    save_smt_adapter(model, path, config=CONFIG)
    assert sorted(f.name for f in path.iterdir()) == sorted(
        [adapter_module.WEIGHTS_NAME, adapter_module.CONFIG_NAME]
    )


def _edit_meta(path, change):
    meta = json.loads((path / adapter_module.CONFIG_NAME).read_text())
    change(meta)
    (path / adapter_module.CONFIG_NAME).write_text(json.dumps(meta))


def _edit_tensors(path, change):
    from safetensors.torch import load_file

    tensors = load_file(path / adapter_module.WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, str(path / adapter_module.WEIGHTS_NAME))


def _first(mapping):
    return next(iter(mapping))


MALFORMED = {
    "no block_size": (lambda m: m.pop("block_size"), None, "field 'block_size' must be a positive integer"),
    "modules as a list": (
        lambda m: m.update(modules=list(m["modules"])),
        None,
        "field 'modules' must be an object",
    ),
    "bad num_blocks": (
        lambda m: m["modules"][_first(m["modules"])].update(num_blocks="3"),
        None,
        r"modules\['.*'\].num_blocks must be a positive integer",
    ),
    "bad config": (
        lambda m: m["config"].update(score="max"),
        None,
        "field 'config' is not a valid SMT config",
    ),
    "malformed fingerprint": (
        lambda m: m["base_fingerprint"][_first(m["base_fingerprint"])].update(samples="x"),
        None,
        r"base_fingerprint\['.*'\] is malformed",
    ),
    "negative error bounds": (
        lambda m: m["base_fingerprint"][_first(m["base_fingerprint"])].update(error_bounds=[-1.0] * 64),
        None,
        r"base_fingerprint\['.*'\] is malformed",
    ),
    "float block_index": (
        None,
        lambda t: t.update({k: v.float() for k, v in t.items() if k.endswith(".block_index")}),
        "must hold integers, not torch.float32",
    ),
    "NaN blocks": (
        None,
        lambda t: t.update(
            {k: torch.full_like(v, float("nan")) for k, v in t.items() if k.endswith(".blocks")}
        ),
        "hold NaN or infinity",
    ),
    "blocks out of order": (
        None,
        lambda t: t.update({k: v.flip(0) for k, v in t.items() if k.endswith(".block_index")}),
        "in another order than SparseLinear's",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_adapters_are_one_clear_sentence(saved, case):
    _, path = saved
    edit_meta, edit_tensors, message = MALFORMED[case]
    if edit_meta:
        _edit_meta(path, edit_meta)
    if edit_tensors:
        _edit_tensors(path, edit_tensors)
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_smt_adapter(model, path)
    if case != "blocks out of order":  # refused before the model was touched
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_without_fingerprint_needs_an_explicit_override(saved):
    _, path = saved
    _edit_meta(path, lambda m: m.update(base_fingerprint={}))
    with pytest.raises(ValueError, match="has no base fingerprint.*pass check_base=False"):
        load_smt_adapter(tiny_causal_lm("llama"), path)
    load_smt_adapter(tiny_causal_lm("llama"), path, check_base=False)


@pytest.mark.parametrize("relative", [0.005, 0.001])
def test_a_slightly_perturbed_base_is_refused(saved, relative):
    """A bf16 copy of the base rounds every weight by up to 0.4% and must pass (see the round
    trip above); a base whose weights moved by 0.5% or 0.1% is another base and must not."""
    _, path = saved
    perturbed = tiny_causal_lm("llama")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in perturbed.parameters():
            param.mul_(1 + relative * torch.randn(param.shape, generator=generator).sign())
    with pytest.raises(ValueError, match="do not match its fingerprint"):
        load_smt_adapter(perturbed, path)


def _quantized_copy(model):
    """``model`` with its decoder linears in 4-bit NF4, as ``load_in_4bit`` loads them."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, module in list(model.named_modules()):
        if name.startswith("model.layers") and type(module) is torch.nn.Linear:
            quantized = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None,
                compute_dtype=torch.float32, quant_type="nf4",
            )  # fmt: skip
            quantized.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized.to("cpu"))
    return model


def test_an_adapter_of_the_float_base_loads_onto_its_4bit_copy_but_not_onto_another_base(saved):
    """A quantized base allows each sample its quantization's error bound: its own float base
    passes, and so does a 4-bit copy of it; an unrelated base differs by far more than the bound."""
    _, path = saved
    load_smt_adapter(_quantized_copy(tiny_causal_lm("llama")), path)
    with pytest.raises(ValueError, match="do not match its fingerprint"):
        load_smt_adapter(_quantized_copy(tiny_causal_lm("llama", seed=1)), path)


def test_an_adapter_saved_on_a_4bit_base_records_its_bounds_and_matches_the_float_base(tmp_path):
    model = _quantized_copy(tiny_causal_lm("llama"))
    apply_smt(model, select_blocks(collect_block_scores(model, lm_batches(2), CONFIG), CONFIG), CONFIG)
    path = save_smt_adapter(model, tmp_path / "adapter", config=CONFIG)
    prints = json.loads((path / "smt_adapter.json").read_text())["base_fingerprint"]
    assert {entry["quantized"] for entry in prints.values()} == {"nf4"}
    assert all(len(e["error_bounds"]) == len(e["samples"]) for e in prints.values())
    load_smt_adapter(tiny_causal_lm("llama"), path)
    with pytest.raises(ValueError, match="do not match its fingerprint"):
        load_smt_adapter(tiny_causal_lm("llama", seed=1), path)
