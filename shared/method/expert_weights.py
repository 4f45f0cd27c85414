"""An expert's weights as the federation names them: the MLP tensors of its owner's dense model.

A contribution's statistics depend on the basis and on these weights (the hidden states a layer passes on depend
on the MLPs below it), so both are recorded with every contribution. The hash is over the manifest of content-
addressed tensors, so an owner, the coordinator and a contributor that downloaded the weights all compute it from
the manifest alone, without reading a byte of the tensors.
"""

from __future__ import annotations

import hashlib

from dume.shared.method.families import Family
from dume.v1 import tensors_pb2


def expert_manifest(model: tensors_pb2.TensorManifest, family: Family) -> tensors_pb2.TensorManifest:
    """The MLP entries of a dense model's manifest, sorted by name."""
    entries = sorted((entry for entry in model.tensors if family.mlp_location(entry.name) is not None),
                     key=lambda entry: entry.name)
    return tensors_pb2.TensorManifest(tensors=entries)


def expert_hash(manifest: tensors_pb2.TensorManifest) -> str:
    """Hex SHA-256 of the expert's MLP manifest serialized deterministically."""
    return hashlib.sha256(manifest.SerializeToString(deterministic=True)).hexdigest()
