"""SMT as a peft method against smt_dist's own path (choose_blocks + apply_smt) on the shipped model."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from paths import MODEL
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from smt_dist import SMTConfig, apply_smt, load_smt_adapter, merge_smt, save_smt_adapter
from smt_dist.core.surgery import smt_modules
from smt_dist.integrations.prepare import choose_blocks
from smt_dist.peft import SMTPeftConfig, from_smt_adapter, preprocess_smt, to_smt_adapter

OPTIONS = dict(
    block_size=16,
    num_blocks=40,
    warmup_steps=4,
    target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
)
VOCAB = 1168  # the shipped tokenizer's


def shipped():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def train(model, params, steps):
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    losses = []
    data = batches(2, seed=7)
    for step in range(steps):  # two batches over and over: the loss must fall
        batch = data[step % 2]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def peft_smt(steps=10):
    model = shipped()
    config = preprocess_smt(model, SMTPeftConfig(**OPTIONS), batches(4))
    model = get_peft_model(model, config)
    losses = train(model, [p for p in model.parameters() if p.requires_grad], steps)
    return model, config, losses


def peft_blocks(model, adapter="default"):
    return {
        name.removeprefix("base_model.model."): module.smt_blocks[adapter].blocks.detach()
        for name, module in model.named_modules()
        if adapter in getattr(module, "smt_blocks", {})
    }


def test_peft_path_equals_apply_smt_bit_for_bit():
    # One process, fp32, CPU: both run SparseLinear's autograd on the same ops in the same order.
    peft_model, config, peft_losses = peft_smt()
    model = shipped()
    selection, _ = choose_blocks(model, batches(4), SMTConfig(**OPTIONS))
    assert config.selection().digest() == selection.digest()
    apply_smt(model, selection, SMTConfig(**OPTIONS))
    own_losses = train(model, [p for p in model.parameters() if p.requires_grad], 10)
    assert peft_losses == own_losses and own_losses[-1] < own_losses[0]
    ours = {name: m.blocks.detach() for name, m in smt_modules(model).items()}
    theirs = peft_blocks(peft_model)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == selection.num_parameters


def test_save_load_merge_and_unmerge_round_trip(tmp_path):
    model, config, _ = peft_smt(steps=3)
    model.eval()
    batch = batches(1, seed=3)[0]
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SMT" and saved["block_pattern"] == config.block_pattern

    loaded = PeftModel.from_pretrained(shipped(), tmp_path / "adapter").eval()
    for name, blocks in peft_blocks(model).items():
        assert torch.equal(peft_blocks(loaded)[name], blocks)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained)
        with loaded.disable_adapter():
            base = loaded(**batch).logits
        assert torch.equal(base, shipped()(**batch).logits)
        assert not torch.allclose(base, trained)

    base_weights = {k: v.clone() for k, v in shipped().state_dict().items()}
    loaded.merge_adapter()
    loaded.unmerge_adapter()  # the base values under the blocks come back exactly
    for key, value in loaded.get_base_model().state_dict().items():
        key = key.replace(".base_layer.", ".")
        if key in base_weights:
            assert torch.equal(value, base_weights[key]), key
    merged = loaded.merge_and_unload()
    assert not any("smt_" in key for key in merged.state_dict())
    with torch.no_grad():
        # W + D in one product against base product plus block products: float rounding only.
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-4, atol=1e-4)


def test_merged_weights_equal_smt_dist_merge(tmp_path):
    model, _, _ = peft_smt(steps=3)
    model.save_pretrained(tmp_path / "peft")
    to_smt_adapter(tmp_path / "peft", tmp_path / "smt")
    ours = merge_smt(load_smt_adapter(shipped(), tmp_path / "smt"))
    theirs = PeftModel.from_pretrained(shipped(), tmp_path / "peft").merge_and_unload()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


def test_a_different_base_is_refused(tmp_path):
    model, _, _ = peft_smt(steps=1)
    model.save_pretrained(tmp_path / "adapter")
    other = shipped()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
        other.model.layers[0].self_attn.v_proj.weight.mul_(1.01)
        for layer in other.model.layers:
            for linear in (
                layer.self_attn.k_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
                layer.self_attn.q_proj,
                layer.self_attn.v_proj,
            ):
                linear.weight.mul_(1.01)
    with pytest.raises(ValueError, match="was trained on another base: the weights of"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


def test_get_peft_model_without_preprocess_says_what_to_do():
    with pytest.raises(ValueError, match=r"run smt_dist.peft.preprocess_smt\(model, config, batches\)"):
        get_peft_model(tiny_causal_lm(), SMTPeftConfig(block_size=16, num_blocks=2))


def test_two_named_adapters_switch():
    base = tiny_causal_lm()
    options = dict(block_size=16, warmup_steps=2, target_modules=["q_proj", "v_proj", "up_proj"])
    first = preprocess_smt(base, SMTPeftConfig(num_blocks=3, **options), lm_batches(2))
    second = preprocess_smt(base, SMTPeftConfig(num_blocks=6, **options), lm_batches(2, seed=9))
    model = get_peft_model(base, first)
    model.add_adapter("second", second)
    with torch.no_grad():
        for module in model.modules():
            for adapter, value in (("default", 0.01), ("second", -0.02)):
                if adapter in getattr(module, "smt_blocks", {}):
                    module.smt_blocks[adapter].blocks.fill_(value)
    batch = lm_batches(1, seed=4)[0]

    def logits_with(adapter):
        reference = tiny_causal_lm()
        config = (first if adapter == "default" else second).smt_config()
        apply_smt(reference, (first if adapter == "default" else second).selection(), config)
        with torch.no_grad():
            for module in smt_modules(reference).values():
                module.blocks.fill_(0.01 if adapter == "default" else -0.02)
            return reference(**batch).logits

    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_with("default"))
        model.set_adapter("second")
        assert torch.equal(model(**batch).logits, logits_with("second"))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".second." in n for n in trainable)


def test_converter_round_trips(tmp_path):
    model = tiny_causal_lm()
    config = SMTConfig(block_size=16, num_blocks=5, warmup_steps=2, target_modules=("q_proj", "v_proj"))
    selection, _ = choose_blocks(model, lm_batches(2), config)
    apply_smt(model, selection, config)
    with torch.no_grad():
        for module in smt_modules(model).values():
            module.blocks.normal_()
    save_smt_adapter(model, tmp_path / "smt", config=config)
    from_smt_adapter(tmp_path / "smt", tmp_path / "peft")
    to_smt_adapter(tmp_path / "peft", tmp_path / "back")
    for file in ("adapter_model.safetensors", "smt_adapter.json"):
        assert (tmp_path / "smt" / file).read_bytes() == (tmp_path / "back" / file).read_bytes(), file
    loaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path / "peft")
    batch = lm_batches(1, seed=2)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_registration_names_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from smt_dist.integrations.peft import TESTED_PEFT, SMTTuner

    assert (
        PEFT_TYPE_TO_CONFIG_MAPPING["SMT"] is SMTPeftConfig and PEFT_TYPE_TO_TUNER_MAPPING["SMT"] is SMTTuner
    )
    version = tuple(int(p) for p in peft.__version__.split(".")[:2])
    assert TESTED_PEFT[0] <= version < TESTED_PEFT[1]


class _OwnLinear(torch.nn.Linear):
    """A base layer that is not a plain nn.Linear: SMT adds its blocks to this layer's own output."""


def test_blocks_over_a_base_layer_of_its_own_match_the_fused_path():
    from smt_dist.integrations.peft import SMTLayer

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48)
    own = _OwnLinear(64, 48)
    own.load_state_dict(plain.state_dict())
    for p in (*plain.parameters(), *own.parameters()):
        p.requires_grad_(False)
    index = torch.tensor([[0, 1], [2, 1], [1, 3], [2, 0]])
    layers = [SMTLayer(base, "default", index, 16) for base in (plain, own)]
    for layer in layers:
        with torch.no_grad():
            layer.smt_blocks["default"].blocks.copy_(
                torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
            )
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.arange(48.0)).sum().backward()
        grads.append((y.detach(), xi.grad, layer.smt_blocks["default"].blocks.grad))
    # The same products summed in another order (a separate base product, then the blocks'): fp32 rounding.
    for fused, over in zip(*grads, strict=True):
        torch.testing.assert_close(over, fused, rtol=1e-5, atol=1e-5)
    # and against dense autograd on W + D
    dense = plain.weight + layers[0].get_delta_weight("default")
    xi = x.clone().requires_grad_(True)
    reference = torch.nn.functional.linear(xi, dense, plain.bias)
    (reference * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(grads[1][0], reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], xi.grad, rtol=1e-5, atol=1e-5)


def test_blocks_cast_to_bf16_as_trl_does_on_quantized_bases():
    # TRL's SFTTrainer casts every trainable parameter to bf16 when the base is 4/8-bit. The
    # blocks then compute exactly as their fp32 values would (the layer upcasts them to the
    # input's dtype, exactly); what bf16 changes is the update: AdamW steps smaller than a
    # delta's bf16 spacing are rounded away (docs: about 7% of elements per step after 60 steps).
    model, _, _ = peft_smt(steps=3)
    batch = batches(1, seed=3)[0]
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)  # what TRL does
        got = model(**batch).logits
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # the same values, in fp32
        want = model(**batch).logits
    assert torch.equal(got, want)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.to(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    train(model, params, 2)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))


def _zero3_save_on_rank(rank, world, out_dir):
    import deepspeed

    from smt_dist.distributed.params import full_value

    base = tiny_causal_lm()
    options = dict(
        block_size=16, num_blocks=6, warmup_steps=2, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    config = preprocess_smt(base, SMTPeftConfig(**options), lm_batches(4)[rank * 2 : rank * 2 + 2])
    model = get_peft_model(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # threshold 0: ZeRO-3 would otherwise keep parameters this small whole on every rank
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=ds_config
    )
    for batch in lm_batches(2, seed=5 + rank):
        engine.backward(engine(**batch).loss)
        engine.step()
    assert all(p.numel() == 0 for p in trainable)  # partitioned: no rank holds a whole block tensor
    model.save_pretrained(f"{out_dir}/adapter", is_main_process=rank == 0)  # on every rank, as peft asks
    reference = {name: full_value(p).clone() for name, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(reference, f"{out_dir}/reference.pt")


def test_zero3_save_pretrained_gathers_only_the_blocks(tmp_path):
    from distributed_utils import run_on_ranks
    from safetensors.torch import load_file

    run_on_ranks(_zero3_save_on_rank, 2, str(tmp_path))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference = torch.load(tmp_path / "reference.pt")
    assert reference and all(key.endswith((".smt_blocks.blocks", ".smt_blocks.block_index")) for key in saved)
    for name, value in reference.items():
        key = name.replace(".default.", ".")
        assert torch.equal(saved[key], value) and value.abs().amax() > 0, name


def test_an_untested_peft_version_is_refused_in_one_sentence(monkeypatch):
    from smt_dist.integrations import peft as smt_peft

    monkeypatch.setattr(peft, "__version__", "0.30.1")
    with pytest.raises(
        ImportError, match=r"peft 0\.30\.1 does not have as expected; install 'peft>=0\.21,<0\.22'"
    ):
        smt_peft._register()


def test_add_adapter_checks_the_base_too():
    base = tiny_causal_lm()
    options = dict(block_size=16, warmup_steps=2, target_modules=["q_proj", "v_proj"])
    first = preprocess_smt(base, SMTPeftConfig(num_blocks=3, **options), lm_batches(2))
    other = preprocess_smt(tiny_causal_lm(seed=5), SMTPeftConfig(num_blocks=3, **options), lm_batches(2))
    model = get_peft_model(base, first)
    with pytest.raises(ValueError, match=r"This SMT adapter \(made for .*\) was trained on another base"):
        model.add_adapter("other", other)


def shipped_in_4bit():
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=torch.float32, device_map={"": "cpu"}, quantization_config=quantization
    )


def test_on_a_4bit_base_the_peft_path_equals_apply_smt_bit_for_bit_and_refuses_to_merge_in_place():
    """QLoRA's setting: a frozen NF4 base. Both paths add the same block products to the base's
    own output (add_block_products), so they agree bit for bit, and the loss falls."""
    model = get_peft_model(
        shipped_in_4bit(), preprocess_smt(shipped_in_4bit(), SMTPeftConfig(**OPTIONS), batches(4))
    )
    peft_losses = train(model, [p for p in model.parameters() if p.requires_grad], 10)
    own = shipped_in_4bit()
    selection, _ = choose_blocks(own, batches(4), SMTConfig(**OPTIONS))
    apply_smt(own, selection, SMTConfig(**OPTIONS))
    own_losses = train(own, [p for p in own.parameters() if p.requires_grad], 10)
    assert peft_losses == own_losses and own_losses[-1] < own_losses[0]
    theirs = peft_blocks(model)
    assert all(torch.equal(m.blocks.detach(), theirs[name]) for name, m in smt_modules(own).items())
    with pytest.raises(ValueError, match=r"Cannot merge SMT blocks into a quantized weight \(fp4\) in place"):
        model.merge_and_unload()
