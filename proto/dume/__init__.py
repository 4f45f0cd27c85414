"""DUME: merge domain-expert language models into one Mixture-of-Experts model, training-free.

This folder is the root of the installed ``dume`` package because protoc places the wire contract's generated
stubs at ``dume/v1``; the libraries live in ``dume.shared``, ``dume.coordinator`` and ``dume.node``.

``import dume`` is fast and changes nothing: the public API below is imported on first use, and the router-bias
MoE classes are registered with transformers only by ``dume.register()`` or ``dume.load_merged()``::

    import dume
    out = dume.merge([dume.ExpertSpec("code", "models/code", "data/code.txt"),
                      dume.ExpertSpec("math", "models/math", "data/math.txt")], "merged/")
    model = dume.load_merged(out)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dume.shared.method.merge import merge
    from dume.shared.method.registration import load_merged, register
    from dume.shared.method.ridge import solve_routers
    from dume.shared.method.settings import ExpertSpec, MergeSettings
    from dume.shared.method.statistics import collect_statistics

# The public API: name -> the module that defines it, imported when the name is first used.
_EXPORTS = {
    "merge": "dume.shared.method.merge",
    "ExpertSpec": "dume.shared.method.settings",
    "MergeSettings": "dume.shared.method.settings",
    "collect_statistics": "dume.shared.method.statistics",
    "solve_routers": "dume.shared.method.ridge",
    "load_merged": "dume.shared.method.registration",
    "register": "dume.shared.method.registration",
}

__all__ = ["ExpertSpec", "MergeSettings", "__version__", "collect_statistics", "load_merged", "merge", "register",
           "solve_routers"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("dume")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dume' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
