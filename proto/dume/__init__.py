"""DUME: merge domain-expert language models into one Mixture-of-Experts model, training-free.

This folder is the root of the installed ``dume`` package because protoc places the wire contract's generated
stubs at ``dume/v1``; the libraries live in ``dume.shared``, ``dume.coordinator`` and ``dume.node``.

Importing ``dume`` registers the router-bias MoE classes with transformers' Auto classes, so that a checkpoint
written with ``router_bias=true`` loads with ``AutoModelForCausalLM.from_pretrained`` after ``import dume``.
"""

from dume.shared.method.registration import register_with_transformers

__version__ = "0.1.0"

register_with_transformers()
