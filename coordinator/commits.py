"""Committing an upload: validate what was staged, adopt its blobs, then record it in the ledger.

The blobs enter the blob store before the ledger row that names them (see ``ledger``), inside the transaction that
writes the row (which ``gc`` waits for); an upload that fails validation is discarded without a trace and refused
as invalid.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from dume.coordinator import messages, validation
from dume.coordinator.errors import Refused
from dume.coordinator.failpoints import failpoint
from dume.coordinator.ledger import Ledger, StateChanged
from dume.coordinator.records import BasisRecord, Contribution
from dume.coordinator.uploads import PlannedUpload, Uploads
from dume.shared.errors import DumeError
from dume.shared.method.expert_weights import expert_hash
from dume.shared.method.families import detect_family
from dume.shared.method.routers import MergeSettings
from dume.shared.transport.blobs import BlobStore
from dume.shared.transport.wire import tensor_from_bytes
from dume.v1 import federation_pb2 as pb

log = logging.getLogger("dume.coordinator")


def commit_upload(ledger: Ledger, uploads: Uploads, settings: MergeSettings, member: str, planned: PlannedUpload,
                  still_authorised: Callable[[], object],
                  validating: Callable[[], AbstractContextManager] = nullcontext) -> bool:
    """Records a complete upload of ``member``; its staging is removed whether it is accepted or refused. Returns
    False for the same upload committed again (its answer was lost on the way): acknowledged, not recorded twice.

    ``still_authorised`` is called inside the transaction that records the upload and raises ``Refused`` when the
    member may no longer act (revoked or gone since the call began): the ledger's state is never overwritten by an
    upload that a state change overtook.
    """
    missing = uploads.missing(planned)
    if missing:
        raise Refused("precondition",
                      f"{len(missing)} blobs of the upload are incomplete: send them before committing")
    try:
        if planned.plan.kind == pb.UPLOAD_KIND_MODEL:
            recorded = _commit_model(ledger, uploads, member, planned, still_authorised)
        else:
            recorded = _commit_statistics(ledger, uploads, settings, member, planned, still_authorised, validating)
    except Refused:
        uploads.discard(planned)
        raise
    except StateChanged as change:
        uploads.discard(planned)
        raise Refused("precondition", f"{change}: the upload was not recorded; join again") from None
    except DumeError as error:
        uploads.discard(planned)
        log.warning("refused %s upload of %s: %s", messages.UPLOAD_KINDS[planned.plan.kind], member, error)
        raise Refused("invalid", str(error)) from None
    uploads.discard(planned)
    return recorded


def _commit_model(ledger: Ledger, uploads: Uploads, member: str, planned: PlannedUpload,
                  still_authorised: Callable[[], object]) -> bool:
    plan = planned.plan
    files = {name: uploads.blob_path(planned, sha) for name, sha in messages.file_hashes(plan).items()}
    config = validation.read_config(files)
    reference = ledger.get_meta("architecture")
    validation.check_model(config, plan.manifest, reference, lambda sha: uploads.blob_path(planned, sha),
                           lambda sha: uploads.checked_finite(planned, sha))
    validation.check_tokenizer_files(messages.tokenizer_files(plan), reference)
    with ledger.transaction():  # adopted and recorded together, so `gc` never sees the blobs unnamed
        still_authorised()
        uploads.adopt(planned)
        if _model_recorded(ledger, member, plan):
            return False  # the same commit again (its answer was lost): acknowledged, not recorded twice
        if reference is None:
            ledger.set_meta("architecture", messages.architecture_of(config, plan.manifest,
                                                                     messages.tokenizer_files(plan)))
        ledger.set_model(member, plan)
        ledger.audit("upload", member, what="model", upload=planned.upload_id, bytes=sum(planned.sizes.values()))
    log.info("%s uploaded its model (%d tensors)", member, len(plan.manifest.tensors))
    return True


def _commit_statistics(ledger: Ledger, uploads: Uploads, settings: MergeSettings, member: str, planned: PlannedUpload,
                       still_authorised: Callable[[], object],
                       validating: Callable[[], AbstractContextManager] = nullcontext) -> bool:
    header = planned.plan.statistics
    config = ledger.get_meta("architecture")["config"]
    node = ledger.member(member)
    basis = ledger.basis(header.basis_hash)
    norm_weight = _router_input_norms(basis, config, uploads.blobs) if basis is not None else None
    with validating():
        validation.check_statistics(header, planned.plan.manifest, config, norm_weight, settings,
                                    lambda sha: uploads.blob_path(planned, sha),
                                    lambda sha: uploads.checked_finite(planned, sha))
        failpoint("commit.validating_statistics")
    contribution = Contribution(member, header.dataset, node.expert, header.basis_hash, header.expert_hash,
                                header.token_count, planned.plan.manifest)
    with ledger.transaction():  # adopted and recorded together, so `gc` never sees the blobs unnamed
        still_authorised()
        _check_current_weights(ledger, contribution)
        check_dataset_room(ledger, member, header.dataset, uploads.limits.datasets_per_node)
        if header.dataset in ledger.removed_datasets(member):
            raise Refused("stale", f"dataset {header.dataset!r} of {member} was taken out of the federation; it is "
                          "not taken back under that name")
        uploads.adopt(planned)
        if ledger.contribution(member, header.dataset) == contribution:
            return False  # the same commit again (its answer was lost): acknowledged, not recorded twice
        if held := outlier(ledger, contribution, uploads.limits.approve_tokens_above_ratio):
            already = ledger.pending_contribution(member, header.dataset)
            if already is not None and already[0] == contribution:
                return False  # held already: the same commit again (the reason may have moved with the others)
            ledger.hold_contribution(contribution, held)
            ledger.audit("hold", member, dataset=header.dataset, expert=node.expert, tokens=header.token_count,
                         reason=held)
            log.warning("statistics of %s/%s held for approval: %s; `dume-coordinator approve %s --dataset %s` "
                        "records them", member, header.dataset, held, member, header.dataset)
            return True
        ledger.set_contribution(contribution)
        ledger.audit("upload", member, what="statistics", dataset=header.dataset, expert=node.expert,
                     basis_hash=header.basis_hash, expert_hash=header.expert_hash, tokens=header.token_count)
    log.info("%s uploaded statistics of %s for %s under basis %s (%d tokens)", member, header.dataset, node.expert,
             header.basis_hash[:12], header.token_count)
    return True


def outlier(ledger: Ledger, contribution: Contribution, ratio: float) -> str:
    """Why ``contribution`` waits for the operator's approval ("" when it does not): it would make its expert's
    token total exceed ``ratio`` times the median of the other experts' totals (0: never held; nor without other
    experts' statistics to compare with). Routing follows the tokens an expert declares (docs/limits.md)."""
    if not ratio:
        return ""
    experts, totals = ledger.experts(), Counter()
    for recorded in ledger.contributions():
        if recorded.expert in experts and (recorded.node, recorded.dataset) != (contribution.node,
                                                                                 contribution.dataset):
            totals[recorded.expert] += recorded.token_count
    others = [tokens for expert, tokens in totals.items() if expert != contribution.expert]
    if not others:
        return ""
    total, median = totals[contribution.expert] + contribution.token_count, statistics.median(others)
    if total <= ratio * median:
        return ""
    return (f"expert {contribution.expert} would hold {total} tokens, {total / median:.1f}x the median of the "
            f"other experts ({median:g}), above limits.approve_tokens_above_ratio = {ratio:g}")


def check_dataset_room(ledger: Ledger, node: str, dataset: str, most: int) -> None:
    """A node records or has held at most ``most`` datasets (a new name past that is refused; replacing one is
    not): each holds a G per layer on the coordinator's disk."""
    held = ledger.datasets(node)
    if dataset not in held and len(held) >= most:
        raise Refused("invalid", f"{node} already contributes {len(held)} datasets, the most a node may "
                      f"(limits.datasets_per_node): forget one first, or ask the operator to raise the limit")


def _check_current_weights(ledger: Ledger, contribution: Contribution) -> None:
    """Statistics count only when computed with the expert's current weights (an update makes earlier ones stale;
    recomputing under the new weights is the node's next step anyway)."""
    owner = ledger.expert_owner(contribution.expert)
    current = ledger.expert_weights(owner) if owner is not None else None
    if current is None:
        raise Refused("precondition", f"expert {contribution.expert!r} has no weights in the federation now: its "
                      "owner has not uploaded them, or has left")
    if expert_hash(current) != contribution.expert_hash:
        raise Refused("stale", f"the statistics were computed with weights {contribution.expert_hash[:12]} "
                      f"of expert {contribution.expert!r}, whose current weights are {expert_hash(current)[:12]}: "
                      "recompute them with the current weights (the node does so when it follows the federation)")


def _model_recorded(ledger: Ledger, member: str, plan: pb.UploadPlan) -> bool:
    """Whether the member is active with exactly this model: a node that crashed before it wrote down the
    coordinator's answer commits the same upload again on its next run."""
    current = ledger.member(member)
    return bool(current and current.state == "active" and current.model == plan.manifest
                and current.files == messages.file_hashes(plan))


def _router_input_norms(basis: BasisRecord, config: dict, blobs: BlobStore) -> Callable[[int], torch.Tensor]:
    """``layer -> `` the basis's norm weight in front of that layer's router, read from its blob when asked."""
    entries, family = {entry.name: entry for entry in basis.manifest.tensors}, detect_family(config)

    def norm_weight(layer: int) -> torch.Tensor:
        entry = entries[family.router_input_key(layer)]
        return tensor_from_bytes(entry, blobs.read_bytes(entry.sha256))

    return norm_weight
