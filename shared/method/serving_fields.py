"""Config fields that every serving stack reads, whichever transformers generation wrote the dense config.

transformers 5 keeps the RoPE settings in one ``rope_parameters`` dict and the dtype in ``dtype``; transformers
4.x (4.46-4.57), vLLM and llama.cpp's converter read the classic ``rope_theta``, ``rope_scaling`` and
``torch_dtype``. A reader that finds no ``rope_theta`` falls back to its class default, which for Mixtral is
1e6, not the 10000 a Llama base used: the model loads without a warning and computes the wrong attention. So the
merged config carries both spellings, derived from whichever one the dense expert's config has.
"""

from __future__ import annotations

import json
from typing import Any

# What a dense Llama, Mistral or Qwen3 config without any RoPE field means (their classes' default base).
DEFAULT_ROPE_THETA = 10000.0


def rope_parameters(dense: dict[str, Any]) -> dict[str, Any]:
    """The dense model's RoPE settings as one transformers-5 ``rope_parameters`` dict.

    Reads ``rope_parameters`` (transformers 5) or else ``rope_theta`` plus ``rope_scaling`` (transformers 4.x,
    and most checkpoints on the Hub).
    """
    if dense.get("rope_parameters"):
        parameters = dict(dense["rope_parameters"])
    else:
        parameters = dict(dense.get("rope_scaling") or {})
        if "type" in parameters:  # the pre-4.45 spelling of rope_type
            parameters.setdefault("rope_type", parameters.pop("type"))
    parameters.setdefault("rope_type", "default")
    parameters.setdefault("rope_theta", float(dense.get("rope_theta", DEFAULT_ROPE_THETA)))
    return parameters


def serving_fields(dense: dict[str, Any]) -> dict[str, Any]:
    """RoPE and dtype fields in both spellings, for the merged config of the dense config ``dense``."""
    parameters = rope_parameters(dense)
    scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    fields: dict[str, Any] = {
        "rope_parameters": parameters,
        "rope_theta": parameters["rope_theta"],
        # transformers 4.x and vLLM read scaling from here; None means plain RoPE to both.
        "rope_scaling": None if scaling["rope_type"] == "default" else scaling,
    }
    dtype = dense.get("dtype") or dense.get("torch_dtype")
    if dtype is not None:
        fields["dtype"] = dtype
        fields["torch_dtype"] = dtype  # transformers < 4.56 and vLLM's "auto" dtype read this one
    return fields


def portable_tokenizer_config(data: bytes) -> bytes:
    """``tokenizer_config.json`` that transformers 4.x can load too.

    transformers 5 saves a plain tokenizers-library tokenizer as ``TokenizersBackend``, a class 4.x lacks
    (AutoTokenizer then fails, and so does llama.cpp's converter, which runs on 4.x). transformers 5 still knows the
    4.x name ``PreTrainedTokenizerFast``, an alias of the same class; any other class is left as the expert wrote it.
    """
    config = json.loads(data)
    if config.get("tokenizer_class") != "TokenizersBackend":
        return data
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
