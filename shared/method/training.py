"""Fine-tuning a causal LM on a member's data: how a node makes its domain expert from the shared base.

Plain next-token training with AdamW on packed rows (see dume.shared.method.data), seeded so that the same base, data
and settings give the same expert.

DUME keeps each expert's MLPs and averages everything else, so whatever an expert learns outside its MLPs is
diluted in the merge. ``trainable="mlp"`` fine-tunes the MLPs only: the shared weights stay the base's, the basis
equals the base, and the merged model with oracle routing is exactly each expert on its own domain.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dume.shared.errors import DumeError
from dume.shared.method.data import load_tokenizer, pack_documents, read_documents
from dume.shared.method.families import detect_family, read_config
from dume.shared.method.placement import Placement
from dume.shared.method.settings import TRAINABLE, TrainSettings
from dume.shared.progress import progress


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens (padding positions are not predicted)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def train(base_dir: str | Path, data_path: str | Path, out_dir: str | Path,
          settings: TrainSettings = TrainSettings()) -> Path:
    """Fine-tune the model in ``base_dir`` on ``data_path`` and save it with its tokenizer to ``out_dir``."""
    base_dir, data_path, out_dir = Path(base_dir), Path(data_path), Path(out_dir)
    read_config(base_dir)  # a missing base is named as such, not as a model hub that cannot be reached
    if settings.trainable not in TRAINABLE:
        raise DumeError(f"cannot train {settings.trainable!r} parameters: use one of {', '.join(TRAINABLE)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DumeError(f"output {out_dir} already exists: remove it or choose another --out")
    device = Placement(settings.device).torch_device()
    tokenizer = load_tokenizer(base_dir)
    data = pack_documents(read_documents(data_path), tokenizer, settings.sequence_length)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    model.to(device).train()
    family = detect_family(model.config.to_dict(), f"the base model {base_dir}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(settings.trainable == "all" or family.mlp_location(name) is not None)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in progress(range(settings.steps), f"training {out_dir.name}", "step"):
        rows = torch.randint(0, len(data.input_ids), (settings.batch_size,), generator=generator)
        batch = data.input_ids[rows].to(device), data.attention_mask[rows].to(device)
        loss = causal_lm_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
    model.cpu().eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
