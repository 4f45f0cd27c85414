"""A member's text data: documents from .jsonl/.txt files or a directory of them, packed into fixed-length rows.

Documents are tokenized with the expert's own tokenizer, each followed by its end-of-sequence token, concatenated
and cut into rows of ``sequence_length`` tokens; the last row is padded and its padding masked out. The result
depends only on the files and the settings, so statistics computed from it are reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dume.shared.errors import DumeError

DATA_SUFFIXES = (".jsonl", ".txt")


def _documents_in_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DumeError(f"{path} is not UTF-8 text: convert it to UTF-8") from None
    except OSError as error:
        raise DumeError(f"cannot read {path} ({error.strerror}): check the path and its permissions") from None
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DumeError(f"{path} line {number} is not valid JSON: write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DumeError(f'{path} line {number} has no string "text" field: write {{"text": "..."}} per line')
        if record["text"].strip():
            documents.append(record["text"])
    return documents


def read_documents(path: Path | str) -> list[str]:
    """All documents under ``path``: one file, or every .jsonl/.txt file of a directory in sorted path order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise DumeError(f"data directory {path} holds no .jsonl or .txt files: add some or point elsewhere")
    elif path.exists():
        if path.suffix not in DATA_SUFFIXES:
            raise DumeError(f"data file {path} is neither .jsonl nor .txt: convert it to one of them")
        files = [path]
    else:
        raise DumeError(f"data path {path} does not exist: pass a .jsonl file, a .txt file or a directory of them")
    documents = [document for file in files for document in _documents_in_file(file)]
    if not documents:
        raise DumeError(f"data at {path} holds no non-empty documents: add text to it")
    return documents


@dataclass(frozen=True)
class PackedData:
    """Rows of token ids and the mask that marks real tokens (1) and padding (0)."""

    input_ids: torch.Tensor  # (rows, sequence_length), int64
    attention_mask: torch.Tensor  # (rows, sequence_length), int64

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size])
            for start in range(0, len(self.input_ids), batch_size)
        ]


def pack_documents(documents: list[str], tokenizer, sequence_length: int) -> PackedData:
    """Tokenize, join with the end-of-sequence token and cut into rows; the last row is padded and masked."""
    if sequence_length < 2:
        raise DumeError(f"sequence length {sequence_length} is too short: use at least 2")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + separator)
    if not stream:
        raise DumeError("the data produced no tokens with this tokenizer: check the data and the model's tokenizer")
    rows = -(-len(stream) // sequence_length)
    padding = rows * sequence_length - len(stream)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor(stream + [pad_id] * padding, dtype=torch.long).view(rows, sequence_length)
    attention_mask = torch.ones(rows * sequence_length, dtype=torch.long)
    if padding:
        attention_mask[-padding:] = 0
    return PackedData(input_ids, attention_mask.view(rows, sequence_length))


def load_tokenizer(model_dir: Path | str):
    """The expert's own tokenizer, from its directory (never from a hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DumeError(f"cannot load the tokenizer in {model_dir} ({first_line}): save one with the model") from None
