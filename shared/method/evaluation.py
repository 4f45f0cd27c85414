"""Perplexity on held-out text: the measure by which a merged model keeps (or loses) what each expert knows."""

from __future__ import annotations

import math

import torch

from dume.shared.method.data import PackedData


def perplexity(model: torch.nn.Module, data: PackedData, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood over every real token that has a real successor)."""
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for input_ids, attention_mask in data.batches(batch_size):
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            counted = attention_mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total_loss += float(losses[counted].sum())
            total_tokens += int(counted.sum())
    return math.exp(total_loss / total_tokens)
