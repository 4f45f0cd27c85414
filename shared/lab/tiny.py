"""Tiny models of the real architectures, built locally (never downloaded): for tests, the demo and benchmarks.

The default tokenizer is byte-level BPE with no merges: 256 byte tokens plus <pad> and <eos>, so any UTF-8 text
tokenizes and nothing needs training. ``trained_tokenizer`` learns byte-level BPE merges from documents instead,
for models whose tokens should carry more than a byte (the quality benchmark's).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

PAD_ID, EOS_ID = 256, 257
VOCAB_SIZE = 258

TINY_DIMENSIONS = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
    "pad_token_id": PAD_ID,
    "bos_token_id": EOS_ID,
    "eos_token_id": EOS_ID,
}

FAMILY_SETTINGS = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"sliding_window": 256, "tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": True, "use_sliding_window": False},
}


# Three small synthetic domains for tests and micro-benchmarks (the demo uses shared.domains instead).
SYNTHETIC_TEMPLATES = {
    "code": "def f{i}(x):\n    return x * {i} + {j}  # loop {j}",
    "math": "Compute {i} + {j}: the sum is {s}. Then {i} * {j} = {p}.",
    "prose": "The river {i} ran quietly past the old mill where {j} swallows nested every summer.",
}


def synthetic_documents(domain: str, count: int, offset: int = 0) -> list[str]:
    """Documents ``offset .. offset+count-1`` of a synthetic domain (deterministic)."""
    template = SYNTHETIC_TEMPLATES[domain]
    return [template.format(i=i, j=(7 * i) % 13, s=i + (7 * i) % 13, p=i * ((7 * i) % 13))
            for i in range(offset, offset + count)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose 256 byte tokens come first, then <pad> and <eos>."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_to_unicode))}
    vocab.update({"<pad>": PAD_ID, "<eos>": EOS_ID})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")


def trained_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE learnt from ``documents``: <pad> and <eos> first, then the 256 bytes, then the merges."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")


def build_tiny_model(family: str, out_dir: Path | str, seed: int = 0,
                     tokenizer: PreTrainedTokenizerFast | None = None, **overrides) -> Path:
    """Write a randomly initialised tiny model of ``family`` with its tokenizer (bytes by default) to ``out_dir``."""
    tokenizer = tokenizer or byte_tokenizer()
    special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    settings = {**TINY_DIMENSIONS, **FAMILY_SETTINGS[family], **special, **overrides}
    config = AutoConfig.for_model(family, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def perturb_mlps(model_dir: Path | str, out_dir: Path | str, seed: int, scale: float = 0.05) -> Path:
    """A copy of a model whose MLPs and shared weights are nudged: a stand-in for a fine-tuned expert."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter) * parameter.std().clamp_min(1e-3))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir
