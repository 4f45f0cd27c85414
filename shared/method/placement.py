"""Where and in which precision a model runs: ``--device`` and ``--dtype`` of ``dume merge`` and ``dume-node``.

``auto`` picks the GPU when torch sees one, else the CPU. On a GPU the model is loaded with an accelerate device
map, so a model larger than one GPU is spread over the GPUs (and the host) rather than placed by hand. The dtype
defaults to the model's own (typically bfloat16). Statistics stay float64 whatever the model runs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dume.shared.errors import DumeError
from dume.shared.method.settings import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class Placement:
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    dtype: str = "auto"  # the model's own, or one of DTYPES

    def torch_device(self) -> torch.device:
        """The device this placement names, refused with one line where this machine's torch cannot use it."""
        name = self.device.strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DumeError(f"--device {self.device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
        if device.type == "cpu":
            return device
        if device.type != "cuda":
            raise DumeError(f"--device {self.device!r} is not supported: use cpu, cuda, cuda:N or auto")
        if not torch.cuda.is_available():
            raise DumeError(f"--device {self.device}: this torch sees no CUDA GPU (a CPU build, or no driver): "
                            "use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DumeError(f"--device {self.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"numbered from 0")
        return device

    def torch_dtype(self) -> torch.dtype | str:
        if self.dtype == "auto":
            return "auto"
        if self.dtype not in DTYPES:
            raise DumeError(f"--dtype {self.dtype!r} is not supported: use auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]

    def loading_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained``: the dtype, and on a GPU the accelerate device map."""
        device, arguments = self.torch_device(), {"dtype": self.torch_dtype()}
        if device.type == "cuda":
            try:
                import accelerate  # noqa: F401  (from_pretrained needs it for a device map)
            except ImportError:
                raise DumeError("running on a GPU needs accelerate: pip install accelerate") from None
            arguments["device_map"] = "auto" if device.index is None else {"": device.index}
        return arguments


CPU = Placement(device="cpu")
