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
6. Stops the nodes and the coordinator (SIGTERM), and prints the held-out perplexity of every model on every
   domain, with what DUME keeps of each expert before and after the revocation.

Every process is started as ``python -m dume.node`` / ``python -m dume.coordinator`` with this interpreter, so
the demo needs no console script on PATH. Everything is written under the work directory: ``logs/`` holds each
process's output, and ``results.json`` the perplexities, the byte-for-byte checks, the transfers each node made
and the seconds each stage took.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from dume.shared.errors import DumeError
from dume.shared.lab.domains import DEMO_DOMAINS, write_domain
from dume.shared.lab.tiny import build_tiny_model
from dume.shared.method.data import load_tokenizer, pack_documents, read_documents
from dume.shared.method.evaluation import perplexity
from dume.shared.method.merge import ExpertSpec, merge, open_experts
from dume.shared.method.routers import MergeSettings
from dume.shared.method.routing import build_weight_averaged_model
from dume.shared.method.training import TrainSettings, train

DEMO_MODEL = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


# Experts fine-tune their MLPs only (`dume-node train`'s default), so every shared weight stays the base's and
# the merge averages nothing away; at a third of the base's learning rate.
EXPERT_LEARNING_RATE = 1e-3
SEQUENCE_LENGTH = 128
REVOKED = "prose"
REVOKE_REASON = "demo: revoked to show exact removal"

START_SECONDS = 60.0  # for the daemon to bind and write daemon.json
CONVERGE_SECONDS = 240.0  # for an exact version over the expected members
EXIT_SECONDS = 30.0  # for a process to exit once refused or signalled
POLL_SECONDS = 1.0
# The coordinator and the nodes run with one torch thread each, so the three nodes share 2 cores without
# oversubscription (at torch's default of a thread per core a node's statistics took 40-55 s instead of 1-4 s).
FEDERATION_THREADS = 1

UPLOADED = re.compile(r"uploaded (\w+): ([\d.]+) MB \(([\d.]+) MB sent\) in ([\d.]+) s")
COMPUTED = re.compile(r"statistics under basis ([0-9a-f]+): (\d+) tokens in ([\d.]+) s")


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


class Federation:
    """The demo's child processes: one-shot CLI calls, and the daemon and agents that run in the background.

    ``close`` stops whatever is still running (SIGTERM, then SIGKILL), so nothing outlives the demo.
    """

    def __init__(self, workdir: Path, started: float) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state = workdir / "coordinator"
        self.started = started
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
        self.threads_env = {**self.env, "OMP_NUM_THREADS": str(FEDERATION_THREADS),
                            "MKL_NUM_THREADS": str(FEDERATION_THREADS)}
        self.processes: dict[str, subprocess.Popen] = {}  # the daemon and the agents, by label
        self.calls: list[subprocess.Popen] = []  # one-shot CLI calls
        self.log_paths: dict[str, Path] = {}
        self._handles: list[IO[bytes]] = []

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    def command(self, app: str, *args: str) -> list[str]:
        return [sys.executable, "-m", f"dume.{app}", *args]

    def run(self, app: str, *args: str) -> str:
        """Runs one CLI call to completion; returns its stdout, or raises with the last line it printed."""
        return self.run_all([(app, *args)])[0]

    def run_all(self, calls: list[tuple[str, ...]]) -> list[str]:
        """Runs CLI calls ``(app, *args)`` side by side; returns their stdouts, or raises for the first failure."""
        running = []
        for app, *args in calls:
            process = subprocess.Popen(self.command(app, *args), env=self.threads_env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.calls.append(process)
            running.append((app, args, process))
        outputs = []
        for app, args, process in running:
            output, errors = process.communicate()
            if process.returncode != 0:
                lines = [line for line in (errors or output).splitlines() if line.strip()]
                raise DumeError(f"`dume-{app} {args[0]}` failed (exit {process.returncode}): "
                                f"{lines[-1].strip() if lines else 'no output'}")
            outputs.append(output)
        return outputs

    def train(self, *args: str, log: Path) -> None:
        """``dume-node train`` with the machine's threads, its output in ``log``."""
        with open(log, "wb") as handle:
            result = subprocess.run(self.command("node", "train", *args), env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=handle, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise DumeError(f"`dume-node train` failed (exit {result.returncode}): {last_line(log)}; see {log}")

    def start(self, label: str, app: str, *args: str) -> subprocess.Popen:
        """Starts a background process whose stdout and stderr go to logs/<label>.log."""
        path = self.logs / f"{label}.log"
        handle = open(path, "wb")
        self._handles.append(handle)
        process = subprocess.Popen(self.command(app, *args), env=self.threads_env, stdin=subprocess.DEVNULL,
                                   stdout=handle, stderr=subprocess.STDOUT)
        self.processes[label], self.log_paths[label] = process, path
        return process

    def serve(self, *settings: str) -> None:
        """``dume-coordinator init`` on loopback (ports picked by the system) with the merge ``settings``, then
        ``serve`` in the background; returns once the daemon listens."""
        self.run("coordinator", "init", "--state", str(self.state), "--listen", "127.0.0.1:0",
                 "--enrolment-listen", "127.0.0.1:0", *settings)
        self.start("coordinator", "coordinator", "serve", "--state", str(self.state))
        deadline = time.monotonic() + START_SECONDS
        while not (self.state / "daemon.json").exists():
            self.check_running()
            if time.monotonic() > deadline:
                raise DumeError(f"the coordinator did not start within {START_SECONDS:.0f} s: see "
                                f"{self.log_paths['coordinator']}")
            time.sleep(0.2)

    def check_running(self, ignore: tuple[str, ...] = ()) -> None:
        """Raises if a background process has exited when it should still run."""
        for label, process in self.processes.items():
            code = process.poll()
            if code is not None and label not in ignore:
                raise DumeError(f"{label} exited early (exit {code}): {last_line(self.log_paths[label])} "
                                f"(logs in {self.logs})")

    def status(self) -> dict[str, Any]:
        # The object `dume-coordinator status --json` prints, read over the same admin mTLS channel. It is read
        # in this process: each `python -m dume.coordinator` pays ~4 s of CPU importing torch, which once a
        # second would take a core away from the nodes on a small machine.
        from dume.coordinator.cli import status_object
        from dume.coordinator.state_dir import StateDir

        return status_object(StateDir(self.state))

    def wait_for(self, what: str, done: Callable[[dict[str, Any]], bool], ignore: tuple[str, ...] = ()) -> int:
        """Polls the status once a second, printing each change, until ``done``; returns the version then."""
        deadline, shown = time.monotonic() + CONVERGE_SECONDS, None
        while True:
            self.check_running(ignore)
            status = self.status()
            line = describe(status)
            if line != shown:
                self.say(line)
                shown = line
            if done(status):
                return int(status["version"])
            if time.monotonic() > deadline:
                raise DumeError(f"the federation did not reach {what} within {CONVERGE_SECONDS:.0f} s: see the logs "
                                f"in {self.logs}")
            time.sleep(POLL_SECONDS)

    def stop(self, label: str, timeout: float = EXIT_SECONDS) -> int:
        """SIGTERM, then the exit code (SIGKILL after ``timeout``, reported as a negative code as usual)."""
        process = self.processes[label]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def close(self) -> None:
        """Stops every process still running, nodes first (the coordinator last), then closes the logs."""
        ordered = sorted(self.processes, key=lambda label: label == "coordinator")
        for process in [*self.calls, *(self.processes[label] for label in ordered)]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for handle in self._handles:
            handle.close()


def describe(status: dict[str, Any]) -> str:
    version = status["version"]
    head = f"version {version} ({'exact' if status['exact'] else 'provisional'})" if version else "no version yet"
    members = []
    for member in status["members"]:
        if member["state"] == "active":
            doing = "statistics current" if member["stats_current"] else "computing statistics"
        elif member["state"] == "enrolled":
            doing = "uploading its model"
        else:
            doing = member["state"]
        members.append(f"{member['name']} {doing}")
    return f"{head}: {', '.join(members) if members else 'no members yet'}"


def converged(members: list[str], gone: tuple[str, ...] = ()) -> Callable[[dict[str, Any]], bool]:
    """Exact version, every expected member active with current statistics, and the ``gone`` ones revoked."""
    def done(status: dict[str, Any]) -> bool:
        by_name = {member["name"]: member for member in status["members"]}
        return bool(status["exact"] and status["version"]
                    and all(name in by_name and by_name[name]["state"] == "active" and by_name[name]["stats_current"]
                            for name in members)
                    and all(name in by_name and by_name[name]["state"] == "revoked" for name in gone))
    return done


@contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def quiet_loading():
    """No "Loading weights" bar from transformers for every model the demo opens."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def differing_files(left: Path, right: Path) -> list[str]:
    """Relative paths whose bytes differ (or that exist on one side only); empty when the trees are identical."""
    files = {path.relative_to(left).as_posix() for path in left.rglob("*") if path.is_file()}
    files |= {path.relative_to(right).as_posix() for path in right.rglob("*") if path.is_file()}
    return sorted(name for name in files
                  if not ((left / name).is_file() and (right / name).is_file()
                          and (left / name).read_bytes() == (right / name).read_bytes()))


def check_identical(federated: Path, reference: Path, version: int, say: Callable[[str], None]) -> bool:
    differing = differing_files(federated, reference)
    say(f"exact version {version} is byte-identical to a local `dume merge`: {'no' if differing else 'yes'}"
        + (f" (differing: {', '.join(differing)})" if differing else ""))
    return not differing


def transfers(log: Path) -> list[dict[str, Any]]:
    """What a node's log says it computed and sent, in order."""
    events: list[dict[str, Any]] = []
    for line in log.read_text(errors="replace").splitlines():
        if match := UPLOADED.search(line):
            events.append({"event": "upload", "what": match.group(1), "megabytes": float(match.group(2)),
                           "sent_megabytes": float(match.group(3)), "seconds": float(match.group(4))})
        elif match := COMPUTED.search(line):
            events.append({"event": "statistics", "basis": match.group(1), "tokens": int(match.group(2)),
                           "seconds": float(match.group(3))})
    return events


def run_demo(workdir: Path, base_steps: int = 300, expert_steps: int = 150) -> dict[str, dict[str, float]]:
    """Run the demo in ``workdir`` (replaced if present) and return perplexity[model][domain].

    results.json in ``workdir`` also holds the byte-for-byte checks, the nodes' transfers and the stage timings.
    """
    with quiet_loading():
        return _run_demo(workdir, base_steps, expert_steps)


def _run_demo(workdir: Path, base_steps: int, expert_steps: int) -> dict[str, dict[str, float]]:
    started = time.monotonic()
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    domains = sorted(DEMO_DOMAINS)
    splits = {name: write_domain(name, workdir / "data") for name in domains}
    mixture = workdir / "data" / "mixture"
    mixture.mkdir()
    for name in domains:
        shutil.copyfile(splits[name][0], mixture / f"{name}.jsonl")
    federation = Federation(workdir, started)
    say = federation.say
    seconds: dict[str, float] = {}
    settings = MergeSettings(sequence_length=SEQUENCE_LENGTH)

    def stage_done(stage: str, since: float) -> float:
        seconds[stage] = round(time.monotonic() - since, 1)
        return time.monotonic()

    try:
        mark = time.monotonic()
        say(f"building a tiny Llama base and pretraining it on {', '.join(domains)} ({base_steps} steps)")
        init = build_tiny_model("llama", workdir / "init", **DEMO_MODEL)
        base = train(init, mixture, workdir / "base", TrainSettings(steps=base_steps, trainable="all"))
        mark = stage_done("base", mark)

        specs = []
        for seed, name in enumerate(domains, start=1):
            say(f"fine-tuning the {name} expert: dume-node train ({expert_steps} steps)")
            out = workdir / "experts" / name
            federation.train("--base", str(base), "--data", str(splits[name][0]), "--out", str(out),
                             "--steps", str(expert_steps), "--learning-rate", str(EXPERT_LEARNING_RATE),
                             "--seed", str(seed), "--sequence-length", str(SEQUENCE_LENGTH),
                             log=federation.logs / f"train-{name}.log")
            specs.append(ExpertSpec(name, out, splits[name][0]))
        mark = stage_done("experts", mark)

        state = federation.state
        say("starting the coordinator on loopback: dume-coordinator init, then serve")
        federation.serve("--sequence-length", str(SEQUENCE_LENGTH))
        say(f"coordinator serving at {json.loads((state / 'daemon.json').read_text())['listen']}; "
            f"one-time join tokens for {', '.join(domains)}: dume-coordinator token")
        issued = federation.run_all([("coordinator", "token", "--state", str(state), "--node", name)
                                     for name in domains])
        tokens = {name: token.strip() for name, token in zip(domains, issued, strict=True)}
        say(f"three nodes join at once and stay online: dume-node join (logs in {federation.logs})")
        for spec in specs:
            federation.start(f"node-{spec.name}", "node", "join", "--token", tokens[spec.name],
                             "--model", str(spec.model_dir), "--data", str(spec.data_path),
                             "--workdir", str(workdir / "nodes" / spec.name))
        version = federation.wait_for(f"an exact version over {', '.join(domains)}", converged(domains))
        say(f"exporting version {version}: dume-coordinator export; merging locally for reference: dume merge")
        federation.run("coordinator", "export", "--state", str(state), "--version", str(version),
                       "--out", str(workdir / "federated" / "all"))
        with torch_threads(FEDERATION_THREADS):
            merge(specs, workdir / "reference-all", settings)
        identical = {"all": check_identical(workdir / "federated" / "all", workdir / "reference-all", version, say)}
        mark = stage_done("federation", mark)

        say(f"revoking {REVOKED}: dume-coordinator revoke")
        revoked = federation.run("coordinator", "revoke", REVOKED, "--state", str(state), "--reason", REVOKE_REASON)
        say(revoked.strip())
        remaining = [spec for spec in specs if spec.name != REVOKED]
        gone = f"node-{REVOKED}"
        version = federation.wait_for(f"an exact version without {REVOKED}",
                                      converged([spec.name for spec in remaining], (REVOKED,)), ignore=(gone,))
        try:
            federation.processes[gone].wait(EXIT_SECONDS)
            say(f"the {REVOKED} node was refused and exited by itself (exit {federation.processes[gone].returncode}):"
                f" {last_line(federation.log_paths[gone])}")
        except subprocess.TimeoutExpired:
            say(f"the {REVOKED} node was still running {EXIT_SECONDS:.0f} s after its revocation: stopping it")
            federation.stop(gone)
        federation.check_running(ignore=(gone,))
        federation.run("coordinator", "export", "--state", str(state), "--version", str(version),
                       "--out", str(workdir / "federated" / "after-revoke"))
        with torch_threads(FEDERATION_THREADS):
            merge(remaining, workdir / "reference-after-revoke", settings)
        identical["after_revoke"] = check_identical(workdir / "federated" / "after-revoke",
                                                    workdir / "reference-after-revoke", version, say)

        exit_codes = {label: federation.stop(label) for label in sorted(federation.processes) if label != "coordinator"}
        exit_codes["coordinator"] = federation.stop("coordinator")
        say("stopped the nodes and the coordinator (SIGTERM); exit codes: "
            + ", ".join(f"{label} {code}" for label, code in exit_codes.items()))
        if exit_codes["coordinator"] != 0:
            raise DumeError(f"the coordinator exited with {exit_codes['coordinator']} on SIGTERM, not 0: "
                            f"{last_line(federation.log_paths['coordinator'])}")
        moved = {spec.name: transfers(federation.log_paths[f"node-{spec.name}"]) for spec in specs}
        for name, events in moved.items():
            uploads = [event for event in events if event["event"] == "upload"]
            bases = sum(event["what"] == "statistics" for event in uploads)
            say(f"{name} sent {sum(event['sent_megabytes'] for event in uploads):.2f} MB in {len(uploads)} uploads "
                f"(its model once, then statistics under {bases} {'basis' if bases == 1 else 'bases'}): "
                "weights and summed statistics only, never its data")
        mark = stage_done("revoke", mark)
    finally:
        federation.close()

    say("evaluating held-out perplexity")
    tokenizer = load_tokenizer(base)
    held_out = {name: pack_documents(read_documents(splits[name][1]), tokenizer, SEQUENCE_LENGTH) for name in domains}
    table = {}

    def evaluate(label: str, model) -> None:
        table[label] = {name: perplexity(model.eval(), data) for name, data in held_out.items()}

    models = {"base": base, **{f"expert:{spec.name}": spec.model_dir for spec in specs}}
    for label, path in models.items():
        evaluate(label, AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True))
    evaluate("weight-average", build_weight_averaged_model(open_experts(specs)))
    for label, path in (("dume", workdir / "federated" / "all"),
                        ("dume-after-revoke", workdir / "federated" / "after-revoke")):
        evaluate(label, AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True))
    stage_done("evaluation", mark)
    seconds["total"] = round(time.monotonic() - started, 1)
    results = {"perplexity": table, "byte_identical": identical, "revoked": REVOKED, "transfers": moved,
               "exit_codes": exit_codes, "seconds": seconds}
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return table


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
