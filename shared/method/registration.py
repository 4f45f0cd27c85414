"""Router-bias variants of the stock MoE classes, derived from the family declarations and registered with
transformers' Auto classes.

Stock Mixtral and Qwen3-MoE routers have no bias. A checkpoint written with ``router_bias=true`` declares the
family's ``biased_model_type`` (``dume_mixtral``, ``dume_qwen3_moe``): the stock class with one change, a bias on
each router. ``register`` (``dume.register()``) makes ``from_pretrained`` load them; ``load_merged`` registers and
loads. Nothing registers on import: ``import dume`` changes no library's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dume.shared.method.families import FAMILIES, Family

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class BiasedRouter(nn.Module):
    """The stock top-k router (softmax, top-k, renormalised weights) with ``logits = W x + b``."""

    def __init__(self, stock: nn.Module, normalize_top_k: bool = True) -> None:
        super().__init__()
        self.top_k = stock.top_k
        self.num_experts = stock.num_experts
        self.hidden_dim = stock.hidden_dim
        self.normalize_top_k = normalize_top_k
        self.weight = stock.weight
        self.bias = nn.Parameter(torch.zeros(self.num_experts, dtype=stock.weight.dtype))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight, self.bias)
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float)
        top_values, top_indices = torch.topk(probabilities, self.top_k, dim=-1)
        if self.normalize_top_k:
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        return logits, top_values.to(logits.dtype), top_indices


def biased_classes(family: Family) -> tuple[type, type]:
    """``(config class, model class)``: the family's stock MoE classes with a bias on every router."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    stock_config = CONFIG_MAPPING[family.moe_model_type]
    stock_model = MODEL_FOR_CAUSAL_LM_MAPPING[stock_config]
    config_class = type(f"Dume{stock_config.__name__}", (stock_config,), {"model_type": family.biased_model_type})

    def __init__(self, config) -> None:
        stock_model.__init__(self, config)
        normalize = getattr(config, "norm_topk_prob", True)  # Mixtral always renormalises; Qwen3-MoE says
        for layer in self.model.layers:
            block = getattr(layer, family.mlp_module)
            if hasattr(block, "gate"):
                block.gate = BiasedRouter(block.gate, normalize_top_k=normalize)
        self.post_init()

    model_class = type(family.biased_architecture, (stock_model,),
                       {"config_class": config_class, "__init__": __init__,
                        "__doc__": f"{stock_model.__name__} with a bias on every router."})
    return config_class, model_class


_registered = False


def register() -> None:
    """Make every family's biased variant loadable through AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for family in {family.moe_model_type: family for family in FAMILIES}.values():
        config_class, model_class = biased_classes(family)
        AutoConfig.register(family.biased_model_type, config_class)
        AutoModelForCausalLM.register(config_class, model_class)
        register_checkpoint_conversion_mapping(family.biased_model_type,
                                               get_checkpoint_conversion_mapping(family.moe_model_type))
    _registered = True


def load_merged(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """A merged checkpoint (``dume merge``, ``dume-node fetch``, ``dume-coordinator export``) loaded with
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` after ``register()``, so that router-bias checkpoints
    load too. Local files only unless ``local_files_only=False`` is passed."""
    from transformers import AutoModelForCausalLM

    register()
    kwargs.setdefault("local_files_only", True)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
