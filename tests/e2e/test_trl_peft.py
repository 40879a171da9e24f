"""TRL's SFTTrainer with ``peft_config=SMTPeftConfig(...)`` under DeepSpeed on 2 CPU ranks.

The example saves with the Trainer's own ``save_model`` (a peft adapter; under ZeRO-3 the Trainer
gathers only the trainable parameters). What must hold, read back with plain peft calls:

- the adapter holds only SMT's blocks and their coordinates, the whole blocks (not ZeRO-3's empty
  partitions), the ones ``adapter_config.json`` names;
- ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` computes what the model computed
  at the end of training (the example's logits on one example), and the base does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_utils import free_port, run_command
from paths import MODEL
from safetensors.torch import load_file
from tiers import tiered

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("zero", tiered(["zero2", "zero3"], ["zero3"]))
def test_sft_trainer_with_smt_peft_config_saves_an_adapter_peft_loads(zero, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import smt_dist.peft  # noqa: F401  # registers the method

    command = [
        "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO / "examples" / "trl_sft_peft_smt.py"),
        "--deepspeed", str(REPO / "configs" / f"{zero}_smt.json"), "--output_dir", str(tmp_path),
    ]  # fmt: skip
    result = run_command(command, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    adapter = tmp_path / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert config["peft_type"] == "SMT" and config["block_pattern"]
    for name, index in config["block_pattern"].items():
        blocks = tensors.pop(f"base_model.model.{name}.smt_blocks.blocks")
        assert blocks.shape == (len(index), 16, 16) and blocks.abs().amax() > 0, name
        assert tensors.pop(f"base_model.model.{name}.smt_blocks.block_index").tolist() == index
    assert not tensors  # nothing but the blocks and their coordinates

    probe = load_file(tmp_path / "probe_logits.safetensors")
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(MODEL), adapter
    ).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(MODEL)
    with torch.no_grad():
        got = merged(input_ids=probe["input_ids"]).logits
        before = base(input_ids=probe["input_ids"]).logits
    # fp32 on both sides; W + D in one product against the engine's base and block products
    torch.testing.assert_close(got, probe["logits"], rtol=1e-4, atol=1e-4)
    assert (before - probe["logits"]).abs().amax() > 1e-2  # training moved the model


def test_sft_trainer_trains_smt_on_a_4bit_base_as_it_trains_qlora(tmp_path):
    """QLoRA's script with SMTPeftConfig in place of LoraConfig: the base in NF4 on 2 DDP ranks;
    the saved adapter, loaded by peft onto the same 4-bit base, computes what trained."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import smt_dist.peft  # noqa: F401  # registers the method

    command = [
        "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO / "examples" / "trl_sft_peft_smt.py"), "--load_in_4bit", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    result = run_command(command, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def base():
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        return AutoModelForCausalLM.from_pretrained(
            MODEL, device_map={"": "cpu"}, quantization_config=quantization
        )

    probe = load_file(tmp_path / "probe_logits.safetensors")
    model = PeftModel.from_pretrained(base(), tmp_path / "final")
    with torch.no_grad():
        got = model(input_ids=probe["input_ids"]).logits
        before = base()(input_ids=probe["input_ids"]).logits
    # The same 4-bit base and blocks, the same fp32 ops in one process instead of DDP's ranks.
    torch.testing.assert_close(got, probe["logits"], rtol=1e-4, atol=1e-4)
    assert (before - probe["logits"]).abs().amax() > 1e-2  # training moved the model
    with pytest.raises(ValueError, match="Cannot merge SMT blocks into a quantized weight"):
        model.merge_and_unload()
