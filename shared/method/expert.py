"""Read-only, lazy access to a dense expert's Hugging Face directory.

Tensors are read one at a time from the safetensors files, so that merging never holds a whole model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import MODEL_MAPPING, AutoConfig, AutoModelForCausalLM

from dume.shared.errors import DumeError
from dume.shared.method.families import Family, detect_family, read_config
from dume.shared.method.lazy_tensors import LazyTensors
from dume.shared.method.placement import CPU, Placement
from dume.shared.method.tensor_file import DTYPES


class DenseWeights(ABC):
    """A member's dense model as the method reads it, tensor by tensor: an ``ExpertDirectory`` on a member's disk,
    or the coordinator's copy of a member's upload. Subclasses set ``config``, ``family`` and ``parameter_names``
    and read tensors and files; the split into shared and MLP parameters is the family's."""

    name: str
    config: dict[str, Any]
    family: Family

    @property
    @abstractmethod
    def parameter_names(self) -> list[str]: ...

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def read_file(self, name: str) -> bytes | None:
        """A non-tensor file of the model (tokenizer, config), or None if it has none."""

    @abstractmethod
    def tensor_shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """A tensor's shape and dtype, read without its data."""

    @abstractmethod
    def tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension; a 0-d tensor has one row), reading only
        those: a vocabulary matrix is averaged a block of rows at a time."""

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @cached_property
    def shared_names(self) -> list[str]:
        return [name for name in self.parameter_names if self.family.mlp_location(name) is None]

    def mlp_tensor(self, layer: int, projection: str) -> torch.Tensor:
        return self.tensor(self.family.mlp_key(layer, projection))


class ExpertDirectory(DenseWeights):
    """A dense expert on disk: its config, family and safetensors files."""

    def __init__(self, path: Path | str, name: str = "the model") -> None:
        self.path = Path(path)
        self.name = name
        self.config = read_config(self.path)
        self.family = detect_family(self.config, f"expert {name!r}")
        self._file_of = self._index_tensors()

    def _index_tensors(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        try:
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {key: self.path / file for key, file in weight_map.items()}
            if single.exists():
                with safe_open(single, framework="pt") as handle:
                    return {key: single for key in handle.keys()}
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise DumeError(f"cannot read the weights of {self.path} ({error}): re-save the model") from None
        raise DumeError(
            f"{self.path} has no safetensors weights: re-save it with save_pretrained(..., safe_serialization=True)"
        )

    @property
    def weight_files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    @property
    def parameter_names(self) -> list[str]:
        return sorted(self._file_of)

    def tensor(self, name: str) -> torch.Tensor:
        try:
            with safe_open(self._file_of[name], framework="pt") as handle:
                return handle.get_tensor(name)
        except KeyError:
            raise DumeError(f"expert {self.name!r} has no tensor {name}: its weights do not match its config") from None
        except (OSError, ValueError, SafetensorError) as error:
            raise DumeError(f"cannot read {name} from {self.path} ({error}): re-save the model") from None

    def read_file(self, name: str) -> bytes | None:
        path = self.path / name
        return path.read_bytes() if path.is_file() else None

    def tensor_shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype = self._read_slice(name, lambda sliced: (tuple(sliced.get_shape()), sliced.get_dtype()))
        if dtype not in DTYPES:
            raise DumeError(f"{name} of expert {self.name!r} is stored as {dtype}: the merge reads floating-point "
                            f"weights ({', '.join(DTYPES)}) only; save the model in one of them")
        return shape, DTYPES[dtype]

    def tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read_slice(name, lambda sliced: sliced[start:stop] if sliced.get_shape() else sliced[...])

    def _read_slice(self, name: str, read: Callable[[Any], Any]) -> Any:
        """``read`` applied to the tensor's safetensors slice (its header, and only the data ``read`` takes)."""
        try:
            with safe_open(self._file_of[name], framework="pt") as handle:
                return read(handle.get_slice(name))
        except KeyError:
            raise DumeError(f"expert {self.name!r} has no tensor {name}: its weights do not match its config") from None
        except (OSError, ValueError, SafetensorError) as error:
            raise DumeError(f"cannot read {name} from {self.path} ({error}): re-save the model") from None

    def tensor_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of every tensor, read from the headers without loading data."""
        layout = {}
        for file in self.weight_files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        sliced = handle.get_slice(key)
                        layout[key] = (tuple(sliced.get_shape()), sliced.get_dtype())
            except (OSError, ValueError, SafetensorError) as error:
                raise DumeError(f"cannot read the weights file {file} ({error}): re-save the model") from None
        return layout


def load_dense_model(expert: ExpertDirectory, placement: Placement = CPU) -> torch.nn.Module:
    """The expert's dense model in evaluation mode, where and in the precision ``placement`` says (by default on
    the CPU in its own dtype)."""
    model = AutoModelForCausalLM.from_pretrained(str(expert.path), local_files_only=True,
                                                 **placement.loading_arguments())
    return model.eval()


def load_decoder(expert: ExpertDirectory, placement: Placement = CPU,
                 replacements: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The expert's decoder stack (embeddings, layers, final norm) without its LM head, in evaluation mode: all the
    statistics' forward needs. ``replacements`` (e.g. the basis) are then read one at a time straight into the
    parameters they name (a ``LazyTensors`` is never held whole); names of the head are skipped."""
    config = AutoConfig.from_pretrained(str(expert.path), local_files_only=True)
    stock = MODEL_MAPPING[type(config)]
    # The checkpoint's head is left on disk on purpose: not an "unexpected key" to report.
    decoder_class = type(stock.__name__, (stock,), {"_keys_to_ignore_on_load_unexpected": [
        *(stock._keys_to_ignore_on_load_unexpected or []), r"^lm_head\."]})
    model = decoder_class.from_pretrained(str(expert.path), config=config, local_files_only=True,
                                          **placement.loading_arguments())
    if replacements is not None:
        prefix = f"{model.base_model_prefix}."
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name in replacements:
                parameter = parameters.get(name.removeprefix(prefix))
                if parameter is None:
                    continue
                if not (isinstance(replacements, LazyTensors) and replacements.read_into(name, parameter.data)):
                    parameter.copy_(replacements[name].to(parameter.dtype))
    return model.eval()


def overwrite_parameters(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace the named parameters' values (e.g. the shared ones by the basis), keeping all others."""
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameter = model.get_parameter(name)
            parameter.copy_(tensor.to(parameter.dtype))
