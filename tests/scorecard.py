"""The reliability scorecard: ``docs/reliability.md``, written by the test suite from a real run.

A reliability test joins a scenario with ``@pytest.mark.scenario("name")`` (or a module's ``pytestmark``); SCENARIOS
says what each one checks. Tests report what they did through the ``record`` fixture: ``record.count("faults
injected", 1)``, ``record.lost(expected_members, status)``. At the end of a session that ran every scenario's tests
(no ``-k``, no node ids, nothing deselected, nothing left unrun by ``-x``), the page is written again; any other run
leaves it as it is, so a partial run never replaces a full card.

    python -m pytest -p no:cacheprovider -m 'scenario' tests/test_faults.py ...   (see SCENARIO_FILES)
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "docs" / "reliability.md"
# name -> what its tests check; a name a marker uses must be here, and a card is written only once every one ran.
SCENARIOS: dict[str, str] = {
    "hostile members": "every named bad input a member can send (identity, plans, tensors, statistics, chunks, "
                       "tokens, malformed protobuf, node data) is refused with its code and one line, and changes "
                       "nothing",
    "fuzzing both ports": "random bytes, malformed protobuf and hostile messages to every method of both ports: a "
                          "status within the deadline, never UNKNOWN/INTERNAL or a traceback, the daemon healthy, "
                          "ledger, blobs and versions unchanged, staging bounded",
    "bad joins": "tokens expired, reused, forged or for another coordinator, a model of another shape or holding "
                 "NaN, empty data and statistics failing each check, through real `dume-node join` processes: "
                 "refused with one line, status unchanged",
    "link faults": "links cut, stalled and slowed mid-upload and mid-download: transfers resume from the durable "
                   "offset, a stall ends at its deadline, the exact version is byte-identical to `dume merge`",
    "processes killed": "the coordinator SIGKILLed during enrolment (before and after it answered), mid-upload "
                        "and mid-statistics, and at "
                        "failpoints in statistics validation, the router solve, a version's publication (blobs "
                        "written, row not) and a revocation (recorded, not yet published); a node SIGKILLed at "
                        "each stage: nothing acknowledged lost or counted twice, nothing half-done visible, no "
                        "revoked member in a later version, the version byte-identical to `dume merge`",
    "upload limits and full disk": "plans checked against the architecture and quotas before a byte, open plans "
                                   "on disk and expiring, a full disk and a state directory gone read-only under "
                                   "the running daemon (ext4 errors=remount-ro) one retryable line, reads served "
                                   "meanwhile, the ledger unchanged, work going on when the disk is back",
    "member boundaries": "hidden pre-revocation versions, another member's blobs not reusable, the federation's "
                         "tokenizer files, FIFOs and changed inputs refused",
    "state changes and races": "a revocation or leave during validation wins, a lost commit answer counted once, "
                               "a lost enrolment answer given again to the same key only, gc during a commit or a "
                               "publication keeps what they reference",
    "watch streams": "many streams of one member leave Status responsive, the extra ones refused, keepalive "
                     "within the server's policy",
    "audit and version skew": "`audit --verify` names the first edited, removed or reordered entry and a cut-off "
                              "end; another protocol version refused with both versions named",
    "exact unlearning": "after a revocation the exact version is byte-identical to a build without the member; "
                        "gc deletes only what nothing references, recorded in the audit log",
    "router capture": "a member that declares its data ten times over: weighed equally it moves no router, the "
                      "routing probe flags its share when weighed by tokens, and an outlier is held for the "
                      "operator (bounded by the dataset limit, dropped with its node, its node told)",
    "load": "32 member processes join at once: each contribution counted once, Status responsive, the exact "
            "version byte-identical to `dume merge`",
}
CODE = ("proto", "shared", "coordinator", "node", "tests", "pyproject.toml", "constraints.txt")  # what a run tests
# What the reliability issue asks for that no scenario test covers yet, said on the card so that it claims no more.
NOT_COVERED: tuple[str, ...] = ()  # what no scenario covers yet, listed on the page
TOTALLED = ("bad inputs tried", "faults injected", "contributions checked", "contributions lost")
SCENARIO_FILES = ("test_hostile_members.py", "test_fuzz_ports.py", "test_federation.py", "test_faults.py",
                  "test_upload_limits.py", "test_member_boundaries.py", "test_state_changes.py", "test_gc_races.py",
                  "test_watch_streams.py", "test_audit_and_protocol.py", "test_gc.py", "test_routing_probe.py",
                  "test_layered_solve.py", "test_load.py")


@dataclass
class Scenario:
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed / failed / skipped
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


class Recorder:
    """What one test reports for its scenario's counts."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def count(self, what: str, value: int = 1) -> None:
        self.scenario.counts[what] += value

    def lost(self, expected: list[str], status: dict[str, Any]) -> None:
        """Contributions lost: expected members that are not active with current statistics in ``status``."""
        current = {m["name"] for m in status["members"] if m["state"] == "active" and m["stats_current"]}
        self.count("contributions lost", len(set(expected) - current))
        self.count("contributions checked", len(set(expected)))


class Scorecard:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.scenarios: dict[str, Scenario] = defaultdict(Scenario)
        self.by_id: dict[str, str] = {}  # scenario test id (collected and selected) -> its scenario
        self.partial = bool(config.option.keyword) or any("::" in arg for arg in config.args)
        self.started = time.time()

    @staticmethod
    def scenario_of(item: pytest.Item) -> str | None:
        marker = item.get_closest_marker("scenario")
        if marker is None:
            return None
        name = marker.args[0]
        if name not in SCENARIOS:
            raise pytest.UsageError(f"{item.nodeid}: unknown scenario {name!r}: add it to tests/scorecard.py")
        return name

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        if any(self.scenario_of(item) for item in items):
            self.partial = True

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.by_id = {item.nodeid: name for item in session.items if (name := self.scenario_of(item))}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """A test's outcome is its call's, or failed when its setup or teardown failed, or skipped."""
        name = self.by_id.get(report.nodeid)
        if name is None:
            return
        scenario = self.scenarios[name]
        scenario.seconds += report.duration
        if (report.when == "call" or report.outcome != "passed") and scenario.outcomes.get(report.nodeid) != "failed":
            scenario.outcomes[report.nodeid] = report.outcome

    def recorder(self, item: pytest.Item) -> Recorder:
        name = self.scenario_of(item)
        if name is None:
            raise pytest.UsageError(f"{item.nodeid} uses `record` but has no scenario marker")
        return Recorder(self.scenarios[name])

    def complete(self) -> str | None:
        """Why this run may not write the card (None: it may)."""
        ran = {test for scenario in self.scenarios.values() for test in scenario.outcomes}
        if self.partial:
            return "a subset was selected (-k, node ids or deselected scenario tests)"
        if missing := sorted(set(SCENARIOS) - {name for name, s in self.scenarios.items() if s.outcomes}):
            return f"no test of {', '.join(missing)} ran"
        if unrun := sorted(set(self.by_id) - ran):
            return f"{len(unrun)} scenario tests did not run (the first: {unrun[0]})"
        return None

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        why = self.complete()
        if why is not None:
            if self.scenarios:
                self.config.get_terminal_writer().line(f"\nscorecard: {CARD.name} not written: {why}")
            return
        CARD.write_text(render(self.scenarios, time.time() - self.started))
        self.config.get_terminal_writer().line(f"\nscorecard: wrote {CARD.relative_to(ROOT)}")


def render(scenarios: dict[str, Scenario], seconds: float) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *CODE], capture_output=True,
                           text=True).stdout.strip()
    totals: Counter[str] = Counter()
    rows = []
    for name in SCENARIOS:
        scenario = scenarios[name]
        outcomes = Counter(scenario.outcomes.values())
        outcome = ", ".join(f"{count} {kind}" for kind, count in sorted(outcomes.items()))
        verdict = "**failed**" if outcomes["failed"] else "passed" if outcomes["passed"] else "skipped"
        counts = "; ".join(f"{what}: {value}" for what, value in sorted(scenario.counts.items())) or "-"
        totals.update({what: value for what, value in scenario.counts.items() if what in TOTALLED})
        rows.append(f"| {name} | {SCENARIOS[name]} | {verdict} ({outcome}) | {counts} | {scenario.seconds:.0f} |")
    total = "; ".join(f"{what}: {value}" for what, value in sorted(totals.items()))
    return "\n".join([
        "# Reliability scorecard",
        "",
        "Written by the test suite (`tests/scorecard.py`) from a real run of every reliability scenario: real",
        "coordinator and node processes on loopback with real TLS, real files, tiny real models. Do not edit it by",
        "hand: run the scenario tests (README, \"Reliability scorecard\") and commit the page they write.",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on commit `{commit}`"
        f"{' with uncommitted changes' if dirty else ''}; {seconds / 60:.1f} min in all.",
        "",
        f"Totals: {total}.",
        "",
        "| scenario | what is checked | outcome (tests) | counts | seconds |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        *(["Not covered by a scenario yet:", "", *(f"- {gap}" for gap in NOT_COVERED), ""] if NOT_COVERED else []),
    ])


def register(config: pytest.Config) -> None:
    """Called from conftest's pytest_configure: the plugin sees every collection and test report of the session."""
    config.pluginmanager.register(Scorecard(config), "dume-scorecard")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Recorder:
    """Counts for the scorecard, under the scenario of the calling test."""
    return request.config.pluginmanager.get_plugin("dume-scorecard").recorder(request.node)
