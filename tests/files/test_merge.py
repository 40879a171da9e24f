"""The streaming merge against the in-memory merge (bit for bit), one shard at a time, bad inputs."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import tiny_causal_lm
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import smt_dist.files.merge as merge_module
from smt_dist import BlockSelection, SMTConfig, apply_smt, load_smt_adapter, merge_smt, save_smt_adapter
from smt_dist.files.base_checkpoint import SafetensorsCheckpoint

SELECTION = {
    "model.layers.0.self_attn.q_proj": [[0, 1], [3, 2]],
    "model.layers.1.self_attn.v_proj": [[1, 0]],
    "model.layers.1.mlp.down_proj": [[2, 5]],
}


@pytest.fixture
def base_and_adapter(tmp_path):
    """A tiny Llama saved in several small shards, and an adapter with random blocks trained on it."""
    base = tmp_path / "base"
    tiny_causal_lm("llama").save_pretrained(base, safe_serialization=True, max_shard_size="40KB")
    config = SMTConfig(block_size=16, num_blocks=4, target_modules=("*_proj",))
    selection = BlockSelection(block_size=16, blocks={k: torch.tensor(v) for k, v in SELECTION.items()})
    model = apply_smt(AutoModelForCausalLM.from_pretrained(base), selection, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    save_smt_adapter(model, tmp_path / "adapter", config=config)
    return base, tmp_path / "adapter"


class ShardTracker:
    """Counts the tensors of earlier shards still alive whenever a new shard is read."""

    def __init__(self, monkeypatch):
        self.alive = 0
        self.reads = 0
        self.alive_at_read = []
        read, save = SafetensorsCheckpoint.shard_tensors, merge_module.save_file

        def shard_tensors(checkpoint, file):
            gc.collect()
            self.alive_at_read.append(self.alive)
            self.reads += 1
            return self.track(read(checkpoint, file))

        def save_file(tensors, path, metadata=None):
            self.track(tensors)
            save(tensors, path, metadata=metadata)

        monkeypatch.setattr(SafetensorsCheckpoint, "shard_tensors", shard_tensors)
        monkeypatch.setattr(merge_module, "save_file", save_file)

    def track(self, tensors):
        for tensor in tensors.values():
            self.alive += 1
            weakref.finalize(tensor, self._dead)
        return tensors

    def _dead(self):
        self.alive -= 1


def test_streaming_merge_equals_the_in_memory_merge_one_shard_at_a_time(
    base_and_adapter, tmp_path, monkeypatch
):
    base, adapter = base_and_adapter
    checkpoint = SafetensorsCheckpoint(base)
    assert len(checkpoint.files) >= 4
    tracker = ShardTracker(monkeypatch)
    merge_module.merge_checkpoint(base, adapter, tmp_path / "merged", dtype=torch.float32)
    assert tracker.reads == len(checkpoint.files)
    assert tracker.alive_at_read == [0] * len(checkpoint.files)  # no earlier shard survives its turn

    expected = merge_smt(load_smt_adapter(AutoModelForCausalLM.from_pretrained(base), adapter)).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert sorted(merged) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key
    written = {key for file in checkpoint.files for key in load_file(tmp_path / "merged" / file)}
    assert written == set(checkpoint.shapes)  # the base's shard layout, key for key


def test_a_bf16_base_stays_bf16(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16)
    merge_module.merge_checkpoint(bf16, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    expected = merge_smt(
        load_smt_adapter(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16), adapter)
    )
    for key, value in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def run_cli(argv, capsys):
    capsys.readouterr()  # what the fixtures printed
    code = merge_module.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_refuses_another_base(base_and_adapter, tmp_path, capsys):
    _, adapter = base_and_adapter
    other = tmp_path / "other"
    tiny_causal_lm("llama", seed=1).save_pretrained(other)
    code, err = run_cli(
        ["--base", str(other), "--adapter", str(adapter), "--output", str(tmp_path / "m")], capsys
    )
    assert code == 1 and len(err.splitlines()) == 1
    assert "was trained on another base: the weights of 'model.layers.0.self_attn.q_proj'" in err
    assert not (tmp_path / "m").exists()


def test_cli_refuses_to_replace_or_overlap(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep me")
    code, err = run_cli(["--base", str(base), "--adapter", str(adapter), "--output", str(existing)], capsys)
    assert code == 1 and "exists and is not empty; pass --overwrite" in err
    assert (existing / "keep.txt").read_text() == "keep me" and len(list(existing.iterdir())) == 1
    code, err = run_cli(["--base", str(base), "--adapter", str(adapter), "--output", str(base / "m")], capsys)
    assert code == 1 and "overlaps the base directory" in err
    code, err = run_cli(
        ["--base", str(tmp_path / "none"), "--adapter", str(adapter), "--output", str(tmp_path / "m")], capsys
    )
    assert code == 1 and "holds no safetensors weights" in err
    code, err = run_cli(
        ["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m")], capsys
    )
    assert code == 0 and (tmp_path / "m" / "config.json").is_file()
