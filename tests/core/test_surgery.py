"""apply_smt / merge_smt on Hugging Face decoders and plain module trees."""

from __future__ import annotations

import pytest
import torch
from block_helpers import block_mask
from conftest import FAMILIES, lm_batches, tiny_causal_lm
from torch import nn

from smt_dist import (
    BlockSelection,
    SMTConfig,
    SparseLinear,
    apply_smt,
    collect_block_scores,
    count_parameters,
    load_smt_adapter,
    merge_smt,
    no_backward_below_blocks,
    save_smt_adapter,
    select_blocks,
)

# Same model, same inputs, merged weight vs. base + block correction: summation order differs.
FP32 = dict(rtol=1e-5, atol=1e-5)


def smt_model(family: str, config: SMTConfig):
    model = tiny_causal_lm(family)
    scores = collect_block_scores(model, lm_batches(config.warmup_steps), config)
    selection = select_blocks(scores, config, total_params=count_parameters(model))
    return apply_smt(model, selection, config), selection


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_changes_only_selected_blocks_and_merge_and_adapter_reproduce(family, tmp_path):
    config = SMTConfig(block_size=16, ratio=0.01, warmup_steps=2, target_modules=("*_proj",))
    model, selection = smt_model(family, config)
    base = tiny_causal_lm(family)
    batch = lm_batches(1, seed=7)[0]
    with torch.no_grad():  # zero deltas: SMT model is the base model
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, **FP32)

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{name}.blocks" for name in selection.blocks)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name.endswith(".blocks"):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
            assert param.grad is None, name

    with torch.no_grad():
        trained = model(**batch).logits
    save_smt_adapter(model, tmp_path / "adapter", config=config)

    merged = merge_smt(model)
    assert not any(isinstance(m, SparseLinear) for m in merged.modules())
    base_modules = dict(base.named_modules())
    for name, module in merged.named_modules():
        if isinstance(module, nn.Linear):
            base_weight = base_modules[name].weight
            if name in selection.blocks:
                inside = block_mask(tuple(base_weight.shape), selection.blocks[name], 16)
                assert torch.equal(module.weight[~inside], base_weight[~inside]), name
                assert not torch.equal(module.weight[inside], base_weight[inside]), name
            else:
                assert torch.equal(module.weight, base_weight), name
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained, **FP32)

    reloaded = load_smt_adapter(tiny_causal_lm(family), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_plain_module_tree_with_loss_fn():
    torch.manual_seed(0)
    model = TwoLayer()
    config = SMTConfig(block_size=8, num_blocks=5, warmup_steps=2, target_modules=("encoder.0", "head"))
    batches = [torch.randn(4, 32) for _ in range(2)]
    scores = collect_block_scores(model, batches, config, loss_fn=lambda m, x: m(x).square().mean())
    assert set(scores) == {"encoder.0", "head"} and scores["head"].shape == (2, 8)
    apply_smt(model, select_blocks(scores, config), config)
    assert sum(m.num_blocks for m in model.modules() if isinstance(m, SparseLinear)) == 5


def test_apply_twice_and_unknown_module_are_clear_errors():
    config = SMTConfig(block_size=16, num_blocks=2, warmup_steps=1)
    model, selection = smt_model("llama", config)
    with pytest.raises(ValueError, match="already has SparseLinear layers"):
        apply_smt(model, selection, config)
    bogus = BlockSelection(block_size=16, blocks={"model.layers.9.self_attn.q_proj": torch.tensor([[0, 0]])})
    with pytest.raises(
        ValueError, match="names module 'model.layers.9.self_attn.q_proj', which this model lacks"
    ):
        apply_smt(tiny_causal_lm(), bogus, config)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_layers_below_the_lowest_selected_block_run_no_backward(checkpointing):
    """Blocks only in layer 2 of 4: backward must stop there. A hook on each decoder layer's
    output counts the gradients autograd computes for it; layers 0-1 must get none (they would if
    the embeddings' output required grad, as peft's ``enable_input_require_grads`` makes it)."""
    from conftest import _SHAPE
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**_SHAPE, "num_hidden_layers": 4}))
    model.config.use_cache = False
    config = SMTConfig(block_size=16, num_blocks=1, target_modules="v_proj")
    apply_smt(model, BlockSelection(16, {"model.layers.2.self_attn.v_proj": torch.tensor([[0, 1]])}), config)
    if checkpointing:  # non-reentrant, transformers' default; it also adds an input-gradient hook
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert no_backward_below_blocks(model)
    model.train()
    reached: list[int] = []

    def count(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: reached.append(index))

        return hook

    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(count(index))
    (batch,) = lm_batches(1)
    model(**batch).loss.backward()
    assert sorted(reached) == [2, 3]
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained == ["model.layers.2.self_attn.v_proj.blocks"]
