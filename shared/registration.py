"""Router-bias variants of the stock MoE classes, registered with transformers' Auto classes.

Stock Mixtral and Qwen3-MoE routers have no bias. A checkpoint written with ``router_bias=true`` declares the
``model_type`` ``dume_mixtral`` or ``dume_qwen3_moe``: the stock class with one change, a bias on each router.
Importing ``dume`` registers them, after which ``AutoModelForCausalLM.from_pretrained`` loads such a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

BIASED_MODEL_TYPES = {"mixtral": "dume_mixtral", "qwen3_moe": "dume_qwen3_moe"}


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


class DumeMixtralConfig(MixtralConfig):
    model_type = "dume_mixtral"


class DumeMixtralForCausalLM(MixtralForCausalLM):
    """Mixtral with a bias on every router."""

    config_class = DumeMixtralConfig

    def __init__(self, config: DumeMixtralConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.gate = BiasedRouter(layer.mlp.gate)
        self.post_init()


class DumeQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "dume_qwen3_moe"


class DumeQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE with a bias on every router."""

    config_class = DumeQwen3MoeConfig

    def __init__(self, config: DumeQwen3MoeConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate = BiasedRouter(layer.mlp.gate, normalize_top_k=config.norm_topk_prob)
        self.post_init()


_registered = False


def register_with_transformers() -> None:
    """Make the biased variants loadable through AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    for stock, config_class, model_class in (
        ("mixtral", DumeMixtralConfig, DumeMixtralForCausalLM),
        ("qwen3_moe", DumeQwen3MoeConfig, DumeQwen3MoeForCausalLM),
    ):
        AutoConfig.register(config_class.model_type, config_class)
        AutoModelForCausalLM.register(config_class, model_class)
        register_checkpoint_conversion_mapping(config_class.model_type, get_checkpoint_conversion_mapping(stock))
    _registered = True
