"""Model families: the one place that knows a family's names.

A family is one declaration (a ``Family`` value in ``FAMILIES``): which dense ``model_type`` it covers, where its
MLP parameters and its router input live, the stock MoE class the merged checkpoint maps to and how a dense MLP's
projections are named inside one of its experts, which config fields carry over, and which dense settings the MoE
class cannot express. The router-bias subclass is derived from it (``registration``). Every other module asks the
family for a name instead of spelling one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dume.shared.errors import DumeError
from dume.shared.method.serving_fields import rope_parameters, serving_fields

# Config fields every supported MoE class takes over unchanged from its dense family.
COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)  # plus the RoPE and dtype fields in both transformers generations' spellings (serving_fields)

# Fields that must agree between experts: they fix every tensor's shape and the computation around the MLPs.
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "attention_bias",
    "mlp_bias",
)


@dataclass(frozen=True)
class Family:
    """How one dense family becomes its stock MoE counterpart."""

    name: str
    dense_model_types: tuple[str, ...]
    moe_model_type: str
    moe_architecture: str
    moe_block: str  # the decoder layer's attribute that holds the MoE block in the checkpoint's names
    expert_projections: dict[str, str]  # dense projection name -> name inside a stock expert
    num_experts_field: str
    expert_intermediate_field: str
    extra_fields: tuple[str, ...] = ()  # dense fields carried over in addition to COMMON_FIELDS
    moe_settings: dict[str, Any] = field(default_factory=dict)  # fixed settings of the MoE config
    refused: dict[str, Any] = field(default_factory=dict)  # dense field -> the only value the MoE can express
    mlp_module: str = "mlp"  # the dense decoder layer's MLP, and the MoE block's attribute in transformers
    router_input: str = "post_attention_layernorm"  # the module whose output the MLP (and so the router) sees

    @property
    def biased_model_type(self) -> str:
        """The ``model_type`` of the stock MoE class with a router bias (see ``registration``)."""
        return f"dume_{self.moe_model_type}"

    @property
    def biased_architecture(self) -> str:
        return f"Dume{self.moe_architecture}"

    def mlp_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.mlp_module}.{projection}.weight"

    def mlp_location(self, parameter: str) -> tuple[int, str] | None:
        """``(layer, projection)`` for an MLP parameter name, None for a shared parameter."""
        parts = parameter.split(".")
        if (len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and parts[3] == self.mlp_module and parts[5] == "weight"):
            return int(parts[2]), parts[4]
        return None

    def router_input_key(self, layer: int) -> str:
        """The router input's norm weight: its dtype is the layer's compute dtype."""
        return f"model.layers.{layer}.{self.router_input}.weight"

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        name = self.expert_projections[projection]
        return f"model.layers.{layer}.{self.moe_block}.experts.{expert}.{name}.weight"

    def router_key(self, layer: int, kind: str = "weight") -> str:
        return f"model.layers.{layer}.{self.moe_block}.gate.{kind}"

    def moe_config(self, dense: dict[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
        """The stock MoE config for ``num_experts`` experts of the dense config ``dense``."""
        config = {key: dense[key] for key in COMMON_FIELDS + self.extra_fields if key in dense}
        config.update(serving_fields(dense))
        config.update(self.moe_settings)
        config.update(
            {
                "model_type": self.moe_model_type,
                "architectures": [self.moe_architecture],
                self.num_experts_field: num_experts,
                self.expert_intermediate_field: dense["intermediate_size"],
                "num_experts_per_tok": top_k,
                "output_router_logits": False,
            }
        )
        return config


LLAMA = Family(
    name="llama",
    dense_model_types=("llama",),
    moe_model_type="mixtral",
    moe_architecture="MixtralForCausalLM",
    moe_block="block_sparse_moe",
    expert_projections={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    num_experts_field="num_local_experts",
    expert_intermediate_field="intermediate_size",
    moe_settings={"sliding_window": None, "router_jitter_noise": 0.0},
    refused={"attention_bias": False, "mlp_bias": False},
)

FAMILIES: tuple[Family, ...] = (
    LLAMA,
    # Mistral is Llama's layout with a sliding window, which Mixtral also has.
    replace(LLAMA, name="mistral", dense_model_types=("mistral",), extra_fields=("sliding_window",),
            moe_settings={"router_jitter_noise": 0.0}, refused={}),
    Family(
        name="qwen3",
        dense_model_types=("qwen3",),
        moe_model_type="qwen3_moe",
        moe_architecture="Qwen3MoeForCausalLM",
        moe_block="mlp",
        expert_projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        num_experts_field="num_experts",
        expert_intermediate_field="moe_intermediate_size",
        extra_fields=("attention_bias",),
        # norm_topk_prob is set explicitly: Qwen3-MoE's default (False) would scale k=1 outputs by the top prob.
        moe_settings={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "use_sliding_window": False, "sliding_window": None},
        refused={"use_sliding_window": False},
    ),
)


def read_config(model_dir: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory, or a DumeError naming what is missing."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).exists():
        raise DumeError(f"model directory {model_dir} does not exist: pass a Hugging Face model directory")
    if not Path(model_dir).is_dir():
        raise DumeError(f"model path {model_dir} is not a directory: pass a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise DumeError(f"{model_dir} has no config.json: pass a Hugging Face model directory") from None
    except (OSError, ValueError) as error:
        raise DumeError(f"cannot read {path} ({error}): repair or re-save the model") from None
    if not isinstance(config, dict):
        raise DumeError(f"{path} is not a JSON object: repair or re-save the model")
    return config


def detect_family(config: dict[str, Any], source: str = "the model") -> Family:
    """The adapter for ``config``, refusing families and settings the MoE classes cannot express."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.dense_model_types:
            for key, allowed in family.refused.items():
                if config.get(key, allowed) != allowed:
                    raise DumeError(
                        f"{source} sets {key}={config[key]!r}, which {family.moe_architecture} cannot express: "
                        f"use an expert with {key}={allowed!r}"
                    )
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.dense_model_types)
    raise DumeError(f"{source} has model_type {model_type!r}, which DUME does not support: use one of {supported}")


def _comparable(config: dict[str, Any], key: str) -> Any:
    """A config field, with the RoPE settings read from either transformers generation's spelling."""
    return rope_parameters(config) if key == "rope_parameters" else config.get(key)


def check_same_architecture(configs: dict[str, dict[str, Any]]) -> Family:
    """The common family of all experts; refuses the first field in which any two experts differ."""
    names = sorted(configs)
    first = names[0]
    family = detect_family(configs[first], f"expert {first!r}")
    for name in names[1:]:
        detect_family(configs[name], f"expert {name!r}")
        for key in ARCHITECTURE_FIELDS:
            mine, theirs = _comparable(configs[first], key), _comparable(configs[name], key)
            if mine != theirs:
                raise DumeError(
                    f"experts {first!r} and {name!r} differ in {key} ({mine!r} vs {theirs!r}): "
                    "all experts must be fine-tuned from one base model"
                )
    return family

