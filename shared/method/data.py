"""A member's text data: documents from .jsonl/.txt files or a directory of them, packed into fixed-length rows.

Documents are tokenized with the expert's own tokenizer, each followed by its end-of-sequence token, concatenated
and cut into rows of ``sequence_length`` tokens; the last row is padded and its padding masked out. The result
depends only on the files and the settings, so statistics computed from it are reproducible.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dume.shared.errors import DumeError

DATA_SUFFIXES = (".jsonl", ".txt")


def _documents_in_file(path: Path) -> Iterator[str]:
    """The file's documents one at a time, so memory never holds more than a line."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                document = _document(path, number, line)
                if document:
                    yield document
    except UnicodeDecodeError:
        raise DumeError(f"{path} is not UTF-8 text: convert it to UTF-8") from None
    except OSError as error:
        raise DumeError(f"cannot read {path} ({error.strerror}): check the path and its permissions") from None


def _document(path: Path, number: int, line: str) -> str | None:
    """The document on one line: the line itself in a .txt file, its "text" field in a .jsonl file. A NUL byte is
    valid UTF-8 but never in text: the file is binary (an archive, a model, an image) given by mistake."""
    if "\x00" in line:
        raise DumeError(f"{path} line {number} holds a NUL byte: it is a binary file, not text; pass UTF-8 text "
                        "(.txt, or .jsonl with a \"text\" field)")
    if not line.strip():
        return None
    if path.suffix == ".txt":
        return line.strip()
    try:
        record = json.loads(line)
    except ValueError:
        raise DumeError(f"{path} line {number} is not valid JSON: write one JSON object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DumeError(f'{path} line {number} has no string "text" field: write {{"text": "..."}} per line')
    return record["text"] if record["text"].strip() else None


def data_files(path: Path | str) -> list[Path]:
    """The files of a data path: one file, or every .jsonl/.txt file of a directory in sorted path order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise DumeError(f"data directory {path} holds no .jsonl or .txt files: add some or point elsewhere")
        return files
    if path.exists():
        if path.suffix not in DATA_SUFFIXES:
            raise DumeError(f"data file {path} is neither .jsonl nor .txt: convert it to one of them")
        if not path.is_file():
            raise DumeError(f"data path {path} is not a regular file: pass a .jsonl file, a .txt file or a directory")
        return [path]
    raise DumeError(f"data path {path} does not exist: pass a .jsonl file, a .txt file or a directory of them")


def iter_documents(path: Path | str) -> Iterator[str]:
    """Every document under ``path``, lazily, in the order ``data_files`` gives."""
    for file in data_files(path):
        yield from _documents_in_file(file)


def check_documents(path: Path | str) -> int:
    """Reads every document once without keeping any (bad data fails before heavy work); returns their number."""
    return _some(sum(1 for _ in iter_documents(path)), path)


def read_documents(path: Path | str) -> list[str]:
    """All documents under ``path`` in memory (for training and evaluation; statistics stream them instead)."""
    documents = list(iter_documents(path))
    _some(len(documents), path)
    return documents


def _some(count: int, path: Path | str) -> int:
    if not count:
        raise DumeError(f"data at {path} holds no non-empty documents: add text to it")
    return count


class Batches(Protocol):
    """Rows of token ids with their masks, in batches: packed in memory, or streamed from the data files."""

    @property
    def expected_tokens(self) -> int | None: ...
    def batches(self, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class PackedData:
    """Rows of token ids and the mask that marks real tokens (1) and padding (0)."""

    input_ids: torch.Tensor  # (rows, sequence_length), int64
    attention_mask: torch.Tensor  # (rows, sequence_length), int64

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def expected_tokens(self) -> int | None:
        return self.num_tokens

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size])
            for start in range(0, len(self.input_ids), batch_size)
        ]


def pack_documents(documents: Iterable[str], tokenizer, sequence_length: int) -> PackedData:
    """Tokenize, join with the end-of-sequence token and cut into rows; the last row is padded and masked."""
    rows = list(_rows(documents, tokenizer, sequence_length))
    if not rows:
        raise DumeError("the data produced no tokens with this tokenizer: check the data and the model's tokenizer")
    return PackedData(*_stacked(rows))


@dataclass(frozen=True)
class DocumentStream:
    """A data path packed into rows lazily, as ``pack_documents`` packs it: memory does not grow with the data.

    With ``max_tokens`` the stream ends after that many real tokens (the row it ends in is padded).
    """

    path: Path
    tokenizer: object
    sequence_length: int
    max_tokens: int | None = None

    @property
    def expected_tokens(self) -> int | None:
        """What a progress bar can promise without reading ahead: the cap, if any."""
        return self.max_tokens

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = _rows(iter_documents(self.path), self.tokenizer, self.sequence_length, self.max_tokens)
        while batch := list(itertools.islice(rows, batch_size)):
            yield _stacked(batch)


def _stacked(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) rows stacked into two (rows, sequence_length) tensors."""
    return torch.stack([ids for ids, _ in rows]), torch.stack([mask for _, mask in rows])


TOKENIZE_DOCUMENTS = 256  # documents tokenized per call: batched for speed, bounded for memory


def _rows(documents: Iterable[str], tokenizer, sequence_length: int,
          max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) rows of ``sequence_length``: documents tokenized a bounded chunk at a time,
    each followed by the end-of-sequence token, concatenated and cut; the last row padded and masked."""
    if sequence_length < 2:
        raise DumeError(f"sequence length {sequence_length} is too short: use at least 2")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream: list[int] = []
    taken, documents = 0, iter(documents)
    while max_tokens is None or taken < max_tokens:
        chunk = list(itertools.islice(documents, TOKENIZE_DOCUMENTS))
        if not chunk:
            break
        tokens = [token for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"] for token in ids + separator]
        if max_tokens is not None:
            tokens = tokens[: max_tokens - taken]
        taken += len(tokens)
        stream.extend(tokens)
        start = 0
        while len(stream) - start >= sequence_length:
            yield (torch.tensor(stream[start : start + sequence_length], dtype=torch.long),
                   torch.ones(sequence_length, dtype=torch.long))
            start += sequence_length
        stream = stream[start:]
    if stream:
        padding = sequence_length - len(stream)
        mask = torch.ones(sequence_length, dtype=torch.long)
        mask[len(stream):] = 0
        yield torch.tensor(stream + [pad_id] * padding, dtype=torch.long), mask


def load_tokenizer(model_dir: Path | str):
    """The expert's own tokenizer, from its directory (never from a hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DumeError(f"cannot load the tokenizer in {model_dir} ({first_line}): save one with the model") from None
