"""``dume demo``: a real federation on one machine, from nothing, in under two minutes on an idle 2-core machine.

1. Writes three built-in domains (code, math, prose), builds a tiny Llama base and pretrains it on their mixture.
2. Fine-tunes one expert per domain, each with ``dume-node train`` in its own process (MLPs only, the default).
3. Starts a coordinator daemon on loopback (``dume-coordinator init`` and ``serve``, ports picked by the system)
   and three node agents (``dume-node join``) that enrol with one-time tokens concurrently and stay online: they
   upload their models, compute statistics under the basis and upload those, until an exact version covers all
   three. Only weights and summed statistics leave a node, never its data.
4. Exports that version (``dume-coordinator export``) and checks it byte for byte against a local ``dume merge``.
5. Revokes the prose member: the coordinator publishes a version without it (exact at once: the experts share
   the base's non-MLP weights, so the basis and the remaining statistics do not change), checked byte for byte
   against a local merge of the two; the revoked node is refused and exits on its own.
6. A second node joins the math expert's group with a dataset of its own: it downloads the math owner's
   weights, sends only its statistics, and the next exact version (checked byte for byte against a local merge
   given the math expert with both datasets) routes with both.
7. Stops the nodes and the coordinator (SIGTERM), and prints the held-out perplexity of every model on every
   domain, with what DUME keeps of each expert before and after the revocation.

Every process is started as ``python -m dume.node`` / ``python -m dume.coordinator`` with this interpreter, so
the demo needs no console script on PATH. Everything is written under the work directory: ``logs/`` holds each
process's output, and ``results.json`` the perplexities, the byte-for-byte checks, the transfers each node made
and the seconds each stage took.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dume.node.workdir import Workdir
from dume.shared.errors import DumeError
from dume.shared.lab.domains import DEMO_DOMAINS, write_domains
from dume.shared.lab.harness import (
    COORDINATOR,
    EXIT_SECONDS,
    FEDERATION_THREADS,
    Federation,
    cli,
    differing_files,
    last_logged,
    quiet_loading,
    torch_threads,
)
from dume.shared.lab.tiny import build_tiny_model
from dume.shared.method.data import load_tokenizer, pack_documents, read_documents
from dume.shared.method.evaluation import perplexity
from dume.shared.method.merge import ExpertSpec, merge, open_experts
from dume.shared.method.registration import load_merged
from dume.shared.method.routers import MergeSettings
from dume.shared.method.routing import build_weight_averaged_model
from dume.shared.method.settings import DatasetSpec
from dume.shared.method.training import TrainSettings, train

DEMO_MODEL = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}
MEMBERS = sorted(DEMO_DOMAINS)

# Experts fine-tune their MLPs only (`dume-node train`'s default), so every shared weight stays the base's and
# the merge averages nothing away; at a third of the base's learning rate.
EXPERT_LEARNING_RATE = 1e-3
SEQUENCE_LENGTH = 128
SETTINGS = MergeSettings(sequence_length=SEQUENCE_LENGTH)
REVOKED = "prose"
CONTRIBUTED = "math"  # the expert a second node feeds after the revocation
REVOKE_REASON = "demo: revoked to show exact removal"

Say = Callable[[str], None]


class Clock:
    """Stamps each message with the seconds since the demo started, and keeps the seconds each stage took."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        since = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - since, 1)


def run_demo(workdir: Path, base_steps: int = 300, expert_steps: int = 150) -> dict[str, dict[str, float]]:
    """Run the demo in ``workdir`` (replaced if present) and return perplexity[model][domain].

    results.json in ``workdir`` also holds the byte-for-byte checks, the nodes' transfers and the stage timings.
    """
    clock, workdir = Clock(), workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    splits = write_domains(MEMBERS, workdir / "data")
    federation = Federation(workdir, threads=FEDERATION_THREADS, say=clock.say)
    with quiet_loading():
        try:
            with clock.stage("base"):
                base = pretrain_base(workdir, base_steps, clock.say)
            with clock.stage("experts"):
                specs = fine_tune_experts(federation, base, splits, expert_steps)
            with clock.stage("federation"):
                identical = {"all": federate(federation, specs)}
            with clock.stage("revoke"):
                identical["after_revoke"] = revoke(federation, specs)
            with clock.stage("second_node"):
                identical["second_node"] = second_node(federation, specs, splits)
                exit_codes = shut_down(federation)
                moved = transfers(federation)
        finally:
            federation.close()
        with clock.stage("evaluation"):
            table = evaluate(workdir, base, splits, specs, clock.say)
    clock.seconds["total"] = round(time.monotonic() - clock.started, 1)
    results = {"perplexity": table, "byte_identical": identical, "revoked": REVOKED, "transfers": moved,
               "exit_codes": exit_codes, "seconds": clock.seconds}
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return table


def pretrain_base(workdir: Path, steps: int, say: Say) -> Path:
    """The shared base every expert starts from: a tiny Llama pretrained in every weight on the domains' mixture."""
    say(f"building a tiny Llama base and pretraining it on {', '.join(MEMBERS)} ({steps} steps)")
    init = build_tiny_model("llama", workdir / "init", **DEMO_MODEL)
    return train(init, workdir / "data" / "mixture", workdir / "base", TrainSettings(steps=steps, trainable="all"))


def fine_tune_experts(federation: Federation, base: Path, splits: dict[str, tuple[Path, Path]],
                      steps: int) -> list[ExpertSpec]:
    """One expert per domain, each with ``dume-node train`` in its own process on all the machine's threads."""
    specs = []
    for seed, name in enumerate(MEMBERS, start=1):
        federation.say(f"fine-tuning the {name} expert: dume-node train ({steps} steps)")
        out = federation.root / "experts" / name
        cli("node", "train", "--base", str(base), "--data", str(splits[name][0]), "--out", str(out),
            "--steps", str(steps), "--learning-rate", str(EXPERT_LEARNING_RATE), "--seed", str(seed),
            "--sequence-length", str(SEQUENCE_LENGTH), log=federation.logs / f"train-{name}.log")
        specs.append(ExpertSpec(name, out, splits[name][0]))
    return specs


def federate(federation: Federation, specs: list[ExpertSpec]) -> bool:
    """A coordinator and a node per expert, joining at once, until an exact version covers them all; returns
    whether its export is byte-identical to a local ``dume merge``."""
    say = federation.say
    say("starting the coordinator on loopback: dume-coordinator init, then serve")
    federation.init("--sequence-length", str(SEQUENCE_LENGTH))
    federation.serve()
    say(f"coordinator serving at {federation.address()}; one-time join tokens for {', '.join(MEMBERS)}: "
        "dume-coordinator token")
    tokens = federation.tokens(MEMBERS)
    say(f"three nodes join at once and stay online: dume-node join (logs in {federation.logs})")
    for spec in specs:
        federation.join(spec.name, spec.model_dir, spec.data_path, tokens[spec.name])
    version = federation.wait_exact(MEMBERS)["version"]
    say(f"exporting version {version}: dume-coordinator export; merging locally for reference: dume merge")
    return check_export(federation, version, "all", specs)


def revoke(federation: Federation, specs: list[ExpertSpec]) -> bool:
    """Revokes one member, until an exact version covers the others and the revoked node has gone; returns
    whether that version's export is byte-identical to a local ``dume merge`` of the others."""
    say, gone = federation.say, f"node-{REVOKED}"
    say(f"revoking {REVOKED}: dume-coordinator revoke")
    say(federation.admin("revoke", REVOKED, "--reason", REVOKE_REASON).stdout.strip())
    remaining = [spec for spec in specs if spec.name != REVOKED]
    version = federation.wait_exact([spec.name for spec in remaining])["version"]
    code = federation.exited(gone)
    if code is None:
        say(f"the {REVOKED} node was still running {EXIT_SECONDS:.0f} s after its revocation: stopping it")
        federation.stop(gone)
    else:
        say(f"the {REVOKED} node was refused and exited by itself (exit {code}): {last_logged(federation.log(gone))}")
    federation.check_running([spec.name for spec in remaining])
    return check_export(federation, version, "after-revoke", remaining)


def second_node(federation: Federation, specs: list[ExpertSpec], splits: dict[str, tuple[Path, Path]]) -> bool:
    """A second lab feeds the math expert with a dataset of its own (statistics only, computed with the math
    owner's weights, which it downloads), until an exact version holds both math contributions; returns whether
    its export is byte-identical to a local ``dume merge`` given the math expert with both datasets."""
    say, lab = federation.say, "math-lab2"
    notes = federation.root / "data" / f"{lab}.jsonl"
    lines = splits[CONTRIBUTED][0].read_text().splitlines(keepends=True)
    notes.write_text("".join(lines[: len(lines) // 2]))  # the demo's stand-in for another lab's math notes
    say(f"a second lab joins the {CONTRIBUTED} expert's group: dume-coordinator token --node {lab} --expert "
        f"{CONTRIBUTED}, then dume-node join --data notes=... (no --model: it sends statistics only)")
    token = federation.admin("token", "--node", lab, "--expert", CONTRIBUTED).stdout.strip()
    federation.join(lab, None, [f"notes={notes}"], token)
    remaining = [spec for spec in specs if spec.name != REVOKED]
    contributions = [f"{spec.name}/default" for spec in remaining] + [f"{lab}/notes"]
    version = federation.wait_exact([spec.name for spec in remaining] + [lab], contributions=contributions)["version"]
    grown = [ExpertSpec(spec.name, spec.model_dir, datasets=(DatasetSpec("default", spec.data_path),
                                                             DatasetSpec("notes", notes, lab)))
             if spec.name == CONTRIBUTED else spec for spec in remaining]
    return check_export(federation, version, "second-node", grown)


def check_export(federation: Federation, version: int, label: str, specs: list[ExpertSpec]) -> bool:
    """Exports ``version`` to federated/LABEL, merges ``specs`` locally to reference-LABEL, compares the bytes."""
    federated = federation.export(federation.root / "federated" / label, version)
    with torch_threads(FEDERATION_THREADS):
        reference = merge(specs, federation.root / f"reference-{label}", SETTINGS)
    differing = differing_files(federated, reference)
    federation.say(f"exact version {version} is byte-identical to a local `dume merge`: "
                   f"{'no' if differing else 'yes'}" + (f" (differing: {', '.join(differing)})" if differing else ""))
    return not differing


def shut_down(federation: Federation) -> dict[str, int]:
    """SIGTERM to the nodes, then the coordinator, which must drain and exit 0; their exit codes by label."""
    exit_codes = federation.stop_all()
    federation.say("stopped the nodes and the coordinator (SIGTERM); exit codes: "
                   + ", ".join(f"{label} {code}" for label, code in exit_codes.items()))
    if exit_codes[COORDINATOR] != 0:
        raise DumeError(f"the coordinator exited with {exit_codes[COORDINATOR]} on SIGTERM, not 0: "
                        f"{last_logged(federation.log(COORDINATOR))}")
    return exit_codes


def transfers(federation: Federation) -> dict[str, list[dict[str, Any]]]:
    """What each node recorded computing and sending, in order; says what each sent."""
    names = sorted(path.name for path in (federation.root / "nodes").iterdir())
    moved = {name: [summary(record) for record in Workdir(federation.workdir(name)).transfers()] for name in names}
    for name, events in moved.items():
        uploads = [event for event in events if event["event"] == "upload"]
        bases = sum(event["what"] == "statistics" for event in uploads)
        sent = ("its model once, then statistics" if uploads and uploads[0]["what"] == "model"
                else "no weights, statistics")
        federation.say(f"{name} sent {sum(event['sent_megabytes'] for event in uploads):.2f} MB in {len(uploads)} "
                       f"uploads ({sent} under {bases} {'basis' if bases == 1 else 'bases'})"
                       ": weights and summed statistics only, never its data")
    return moved


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """A node's transfer record as results.json shows it: megabytes and seconds to two decimals, a short basis."""
    if record["event"] == "upload":
        return {"event": "upload", "what": record["what"], "megabytes": round(record["bytes"] / 1e6, 2),
                "sent_megabytes": round(record["sent_bytes"] / 1e6, 2), "seconds": round(record["seconds"], 2)}
    return {"event": "statistics", "basis": record["basis"][:12], "tokens": record["tokens"],
            "seconds": round(record["seconds"], 2)}


def evaluate(workdir: Path, base: Path, splits: dict[str, tuple[Path, Path]], specs: list[ExpertSpec],
             say: Say) -> dict[str, dict[str, float]]:
    """Held-out perplexity of every model on every domain: the base, the experts, their weight average and the
    two exported versions."""
    say("evaluating held-out perplexity")
    tokenizer = load_tokenizer(base)
    held_out = {name: pack_documents(read_documents(splits[name][1]), tokenizer, SEQUENCE_LENGTH) for name in MEMBERS}

    def measure(model: torch.nn.Module) -> dict[str, float]:
        return {name: perplexity(model.eval(), data) for name, data in held_out.items()}

    saved = {"base": base, **{f"expert:{spec.name}": spec.model_dir for spec in specs}}
    table = {label: measure(load_model(path)) for label, path in saved.items()}
    table["weight-average"] = measure(build_weight_averaged_model(open_experts(specs)))
    table["dume"] = measure(load_model(workdir / "federated" / "all"))
    table["dume-after-revoke"] = measure(load_model(workdir / "federated" / "after-revoke"))
    return table


def load_model(path: Path) -> torch.nn.Module:
    return load_merged(path)  # a dense model or a merged checkpoint, router-bias ones included


def format_table(table: dict[str, dict[str, float]], revoked: str | None = REVOKED) -> str:
    """Perplexity rows per model, one column per domain, and DUME's retention of each domain's expert.

    Retention is expert perplexity / DUME perplexity on the expert's own domain; after the revocation it is shown
    for the remaining domains only.
    """
    domains = sorted(next(iter(table.values())))
    lines = [f"{'held-out perplexity':<22}" + "".join(f"{name:>10}" for name in domains)]
    for label, row in table.items():
        lines.append(f"{label:<22}" + "".join(f"{row[name]:>10.2f}" for name in domains))
    retention = [table[f"expert:{name}"][name] / table["dume"][name] for name in domains]
    lines.append(f"{'dume retention':<22}" + "".join(f"{value:>10.1%}" for value in retention))
    if "dume-after-revoke" in table:
        cells = ["-" if name == revoked else f"{table[f'expert:{name}'][name] / table['dume-after-revoke'][name]:.1%}"
                 for name in domains]
        lines.append(f"{'after-revoke retention':<22}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)
