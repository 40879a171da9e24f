"""The peft tuner model: puts an ``SMTLayer`` on every module the config selects blocks in.

peft drives it (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``,
``merge_and_unload``); this class says which modules are targets (those named in
``block_pattern``, nothing else), refuses a base the adapter was not trained on before any layer
changes, and saves only the blocks, gathering them alone when ZeRO-3 partitions them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from smt_dist.core.blocks import weight_shape
from smt_dist.core.quantized import keep_layout
from smt_dist.distributed.params import full_value, is_partitioned
from smt_dist.files.adapter import base_fingerprint, check_fingerprint
from smt_dist.integrations.peft.config import SMTPeftConfig
from smt_dist.integrations.peft.layer import SMTLayer


class SMTTuner(BaseTuner):
    """Sparse Matrix Tuning as a peft tuner (``peft_type`` ``"SMT"``)."""

    prefix = "smt_"
    tuner_layer_cls = SMTLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # SMT's targets come from the warm-up

    def _prepare_adapter_config(self, peft_config: SMTPeftConfig, model_config: dict) -> SMTPeftConfig:
        """Before any layer changes, on every path that adds an adapter (``get_peft_model``,
        ``from_pretrained``, ``add_adapter``, ``load_adapter``): the config selects blocks, every
        selected module exists with a grid its blocks fit, and the base is the adapter's."""
        peft_config.selection()  # a sentence when preprocess_smt has not run
        keep_layout(self.model)  # 4-bit layers, tuned or not, keep computing what they computed
        linears = {
            name: weight_shape(
                module.get_base_layer().weight if isinstance(module, SMTLayer) else module.weight
            )
            for name, module in self.model.named_modules()
            if name in peft_config.block_pattern and hasattr(module, "weight")
        }
        peft_config.check_shapes(linears)
        if peft_config.base_fingerprint:
            names = sorted(peft_config.base_fingerprint)
            base = peft_config.base_model_name_or_path or "a base not recorded"
            check_fingerprint(
                peft_config.base_fingerprint,
                base_fingerprint(self.model, names),
                base,
                adapter=f"This SMT adapter (made for {base})",
            )
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: SMTPeftConfig, key: str) -> bool:
        return key in peft_config.block_pattern

    def _create_and_replace(
        self,
        peft_config: SMTPeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **_: object,
    ) -> None:
        index = torch.tensor(peft_config.block_pattern[current_key], dtype=torch.int64).reshape(-1, 2)
        if isinstance(target, SMTLayer):
            target.update_layer(adapter_name, index, peft_config.block_size)
            return
        if not isinstance(getattr(target, "weight", None), torch.Tensor):
            raise ValueError(
                f"SMT selects blocks of '{current_key}', a {type(target).__name__} without a weight."
            )
        layer = SMTLayer(target, adapter_name, index, peft_config.block_size)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # a second adapter starts frozen, as peft's others do
        self._replace_module(parent, target_name, layer, target)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's blocks and indices. Blocks still partitioned in ``state_dict`` (a ZeRO-3
        model's own ``state_dict()``, on every rank) are gathered one at a time, never the base; a
        state dict gathered already (the Trainer's, on rank 0 alone) is used as it is."""
        chosen = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        params = dict(model.named_parameters())
        for key, value in chosen.items():
            param = params.get(key, params.get(f"base_model.model.{key}"))
            if param is not None and is_partitioned(param) and value.shape != weight_shape(param):
                chosen[key] = full_value(param).cpu()
        return chosen
