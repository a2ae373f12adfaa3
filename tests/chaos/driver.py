"""The chaos driver: publish numbered messages, attack the workers and the broker, count.

One run on one backend, in phases keyed to progress (the share of messages already processed),
so every attack lands mid-stream whatever the machine's speed:

A. one ``stalk run`` process: SIGKILLed at random moments and started again (as a supervisor
   would), the broker restarted (or paused) once while delayed retries are pending, connections
   cut through the proxy; then a burst is published and the worker SIGTERMed in it, and the drain
   must end within the grace.
B. ``stalk run --processes 2``: its worker processes SIGKILLed at random moments (the supervisor
   restarts them), connections cut; then the supervisor is SIGTERMed with the same check.
C. ``stalk run --until-empty --allow-errors`` until it exits 0 (started again when a poison pill
   kills it), then the error topic is read with ``stalk run tests.chaos.handler:collect``.

Poison pills (``os._exit(1)`` on every delivery) are mixed into the stream from the start; a
worker they kill in phase A is started again by the driver, in phase B by the supervisor.

Lost = 0 means every id was processed (an ok committed to a handler's file) or is on the error
topic with its body byte-identical. The handler records each call as it starts, so a SIGKILL
leaves the ids it was handling as calls without an outcome: the redelivery of an id is the time
from the kill to the next call of that id, in any process.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.handler import body_of
from tests.chaos.targets import TARGETS, Target
from tests.ops._proc import Stalk

#: A worker taking longer than this to exit after SIGTERM beyond the grace failed the drain.
EXIT_SLACK_S = 10.0
HANDLER = "tests.chaos.handler:handle"


@dataclass
class Plan:
    """How hard to hit one backend."""

    backend: str
    messages: int
    kills: int = 6
    pills: int = 3
    cuts: int = 5
    concurrency: int = 4
    max_retries: int = 5
    visibility_s: float = 3.0
    grace_s: float = 5.0
    #: Every ``retry_every``-th message asks for one delayed retry.
    retry_every: int = 10
    retry_delay_s: float = 2.0
    #: Least time between two kills (more than a lease, so one kill's messages are back first).
    kill_gap_s: float = 4.0
    #: No new id processed for this long while messages wait: a stuck worker (a problem).
    stall_limit_s: float = 60.0
    #: Roughly how long the stream should last (the handler sleeps to spread it out).
    pace_s: float = 60.0
    seed: int = 0
    #: Longest the whole run may take before it fails as hung.
    patience_s: float = 900.0

    @classmethod
    def full(cls, backend: str, seed: int = 0, messages: int | None = None) -> Plan:
        return cls(backend, messages or (5000 if backend == "local" else 2000), seed=seed)

    @classmethod
    def short(cls, backend: str, seed: int = 0, messages: int | None = None) -> Plan:
        return cls(
            backend,
            messages or (800 if backend == "local" else 300),
            kills=5,
            pills=1,
            cuts=3,
            max_retries=2,
            visibility_s=2.0,
            grace_s=3.0,
            retry_delay_s=1.5,
            kill_gap_s=1.0,
            pace_s=8.0,
            seed=seed,
            patience_s=200.0,
        )


@dataclass
class Report:
    backend: str
    messages: int = 0
    pills: int = 0
    kills: int = 0
    kills_supervised: int = 0
    disruption: str | None = None
    disruptions: int = 0
    retries_pending: int = 0
    cuts: int | None = None
    connections_cut: int = 0
    pills_routed: int = 0
    pill_deliveries: int = 0
    max_deliveries: int = 0
    pill_deaths: int = 0
    lost: list[int] = field(default_factory=list)
    duplicated: int = 0
    longest_redelivery_s: float | None = None
    #: Longest time no new id was processed while some were waiting (phases A and B).
    longest_stall_s: float = 0.0
    #: Times the stream stood still past the plan's limit (workers killed to go on).
    stuck: int = 0
    in_flight_at_kills: int = 0
    not_redelivered: int = 0
    drains: list[float] = field(default_factory=list)
    grace_s: float = 0.0
    healthy_on_errors: int = 0
    on_errors: int = 0
    drain_rounds: int = 0
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        what = f"{self.disruptions} {self.disruption}" if self.disruption else "n/a"
        if self.disruption and self.retries_pending:
            what += f" ({self.retries_pending} delayed retries pending)"
        cuts = "n/a" if self.cuts is None else f"{self.cuts} ({self.connections_cut} connections)"
        longest = "-" if self.longest_redelivery_s is None else f"{self.longest_redelivery_s:.1f} s"
        drains = ", ".join(f"{s:.1f} s" for s in self.drains)
        return [
            ("messages", f"{self.messages} (+ {self.pills} poison pills)"),
            ("kills (SIGKILL)", f"{self.kills} ({self.kills_supervised} under --processes 2)"),
            ("broker restarts/pauses", what),
            ("connection cuts", cuts),
            (
                "poison pills",
                f"{self.pills_routed}/{self.pills} routed as poison, at most "
                f"{self.pill_deliveries} deliveries (limit {self.max_deliveries})",
            ),
            ("lost", str(len(self.lost))),
            ("duplicated", str(self.duplicated)),
            ("healthy on error topic", str(self.healthy_on_errors)),
            ("longest redelivery", f"{longest} after a kill ({self.in_flight_at_kills} in flight)"),
            ("SIGTERM drains", f"{drains} (grace {self.grace_s:.0f} s)"),
            ("longest stall", f"{self.longest_stall_s:.1f} s ({self.stuck} stuck workers)"),
        ]

    #: Columns of :func:`markdown`, the README's table.
    COLUMNS = (
        "backend", "messages", "kills", "broker restarts/pauses", "connection cuts",
        "poison pills", "lost", "duplicated", "longest redelivery",
    )  # fmt: skip

    def cells(self) -> list[str]:
        rows = dict(self.rows())
        what = f"{self.disruptions} {self.disruption}" if self.disruption else "n/a"
        cuts = "n/a" if self.cuts is None else str(self.cuts)
        longest = "-" if self.longest_redelivery_s is None else f"{self.longest_redelivery_s:.1f} s"
        return [
            self.backend,
            f"{self.messages:,}",
            f"{self.kills} ({self.kills_supervised} of them `--processes 2`)",
            what,
            cuts,
            f"{self.pills_routed}/{self.pills} as `poison`",
            rows["lost"],
            rows["duplicated"],
            longest,
        ]

    def table(self) -> str:
        rows = [("backend", self.backend), *self.rows()]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        bar = "-" * max(len(line) for line in lines)
        extra = [f"  note: {n}" for n in self.notes] + [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join([bar, lines[0], bar, *lines[1:], bar, *extra])

    @property
    def ok(self) -> bool:
        return not self.problems


class Ledger:
    """What the handlers wrote: one calls file per worker process in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _files(self, prefix: str) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob(f"{prefix}-*.db"):
            found.append((int(path.stem.split("-")[1]), path))
        return found

    @staticmethod
    def _query(path: Path, sql: str, *args: Any) -> list[Any]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # created but no table yet
            return []
        finally:
            conn.close()

    def processed(self) -> int:
        """Count the ids with an ok outcome: the progress of the stream."""
        done: set[int] = set()
        for _, path in self._files("calls"):
            rows = self._query(path, "SELECT id FROM calls WHERE outcome = 'ok'")
            done.update(row[0] for row in rows)
        return len(done)

    def calls_of(self, pids: list[int]) -> int:
        paths = dict(self._files("calls"))
        return sum(
            len(self._query(paths[pid], "SELECT 1 FROM calls LIMIT 1"))
            for pid in pids
            if pid in paths
        )

    def pending_retries(self) -> int:
        """Ids that asked for a retry and have no ok yet: delayed retries waiting somewhere."""
        retried, done = set(), set()
        for _, path in self._files("calls"):
            for number, outcome in self._query(path, "SELECT id, outcome FROM calls"):
                (retried if outcome == "retry" else done).add(number)
        return len(retried - done)

    def unfinished(self, pids: list[int]) -> list[int]:
        paths = dict(self._files("calls"))
        return [
            row[0]
            for pid in pids
            if pid in paths
            for row in self._query(paths[pid], "SELECT id FROM calls WHERE outcome IS NULL")
        ]

    def calls(self) -> list[tuple[int, int, float, str | None]]:
        """Every call: (pid, id, started, outcome)."""
        return [
            (pid, number, started, outcome)
            for pid, path in self._files("calls")
            for number, started, outcome in self._query(
                path, "SELECT id, started, outcome FROM calls"
            )
        ]

    def errors(self, prefix: str = "errors") -> list[tuple[int, bytes, dict[str, str]]]:
        return [
            (number, bytes(body), json.loads(attributes))
            for _, path in self._files(prefix)
            for number, body, attributes in self._query(
                path, "SELECT id, body, attributes FROM errors"
            )
        ]


def children(pid: int) -> list[int]:
    """Return the PIDs whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class Driver:
    """Run one :class:`Plan` against its :class:`~tests.chaos.targets.Target`."""

    def __init__(self, plan: Plan, workdir: Path, say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.workdir = workdir
        self.rng = random.Random(plan.seed)
        self.say = say
        self.calls_dir = workdir / "calls"
        self.calls_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.calls_dir)
        self.target: Target = TARGETS[plan.backend](workdir)
        self.report = Report(plan.backend, grace_s=plan.grace_s)
        self.kills: list[tuple[float, list[int]]] = []
        self.worker: Stalk | None = None
        self.sent = 0
        #: Every worker started, for its log (``logs/`` in the work directory).
        self.started: list[Stalk] = []
        self.unsent: list[int] = []
        self.deadline = 0.0
        burst = max(plan.messages // 10, 1)
        self.main = plan.messages - burst
        self.expected: dict[int, bytes] = {}
        self.kinds: dict[int, str] = {}

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        self.deadline = started + self.plan.patience_s
        try:
            self.target.start()
        except BaseException:
            with contextlib.suppress(Exception):  # whatever of it did start
                self.target.stop()
            raise
        try:
            self._run()
        finally:
            if self.worker is not None:  # a failed run: no orphaned --processes workers either
                for pid in children(self.worker.process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.worker.close()
            self._keep_logs()
            self.target.stop()
        self.report.elapsed_s = time.monotonic() - started
        self.report.notes += self.target.notes
        return self.report

    def _keep_logs(self) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        for number, worker in enumerate(self.started):
            text = f"{' '.join(worker.process.args)}\n{worker.stderr}\n"  # type: ignore[arg-type]
            (logs / f"{number:03d}-{worker.process.pid}.log").write_text(text)

    def _run(self) -> None:
        plan = self.plan
        self._publish_main()
        sleep_s = plan.concurrency * plan.pace_s / plan.messages
        self.env = {
            "CHAOS_DIR": str(self.calls_dir),
            "CHAOS_SLEEP_S": f"{sleep_s:.4f}",
            "CHAOS_RETRY_DELAY_S": str(plan.retry_delay_s),
            **self.target.env(),
        }
        kills_a = (plan.kills + 1) // 2
        phase_a = [("kill", self.rng.uniform(0.05, 0.4)) for _ in range(kills_a)]
        phase_a += [("cut", self.rng.uniform(0.05, 0.45)) for _ in range((plan.cuts + 1) // 2)]
        if self.target.disruption:
            phase_a.append(("disrupt", self.rng.uniform(0.15, 0.3)))
        phase_b = [("kill", self.rng.uniform(0.5, 0.8)) for _ in range(plan.kills - kills_a)]
        phase_b += [("cut", self.rng.uniform(0.5, 0.85)) for _ in range(plan.cuts // 2)]
        # Each phase gets its share of the stream up front; a phase whose events are still
        # waiting when its share runs dry takes more (see _starving), so no attack ever waits
        # on an empty queue.
        self._feed(plan.messages // 2)
        self.say(f"{plan.backend}: phase A (one process): {len(phase_a)} events")
        self._phase(phase_a, end=0.45, processes=1)
        self._feed(len(self.unsent))
        self.say(f"{plan.backend}: phase B (--processes 2): {len(phase_b)} events")
        self._phase(phase_b, end=0.9, processes=2)
        self.say(f"{plan.backend}: phase C (drain with --until-empty)")
        self._drain()
        self._count()

    def _publish_main(self) -> None:
        plan = self.plan
        total = plan.messages + plan.pills
        burst = plan.messages - self.main
        # Pills go out with the first batch, never in the burst.
        pills = set(self.rng.sample(range(total - burst), plan.pills))
        for number in range(total):
            if number in pills:
                kind = "poison"
            elif number % plan.retry_every == plan.retry_every // 2:
                kind = "retry"
            else:
                kind = "ok"
            self.kinds[number] = kind
            self.expected[number] = body_of(number, kind)
        self.burst = list(range(total - burst, total))
        self.unsent = list(range(total - burst))
        self.report.messages = plan.messages
        self.report.pills = plan.pills
        self.report.max_deliveries = plan.max_retries + 1

    def _feed(self, count: int) -> None:
        """Publish the next ``count`` messages of the main stream."""
        batch, self.unsent = self.unsent[:count], self.unsent[count:]
        if batch:
            self.target.publish([self.expected[n] for n in batch])
            self.sent += len(batch) - sum(self.kinds[n] == "poison" for n in batch)

    def _args(self, *extra: str) -> list[str]:
        plan = self.plan
        return [
            "run", HANDLER, *self.target.cli(), "--source", self.target.source,
            "--error-topic", self.target.errors,
            "--concurrency", str(plan.concurrency), "--max-retries", str(plan.max_retries),
            "--visibility-timeout", str(plan.visibility_s),
            "--shutdown-grace", str(plan.grace_s), "--max-polling-period", "1",
            "--quiet", *extra,
        ]  # fmt: skip

    def _start(self, processes: int, *extra: str) -> Stalk:
        more = ["--processes", str(processes)] if processes > 1 else []
        worker = Stalk(*self._args(*more, *extra), env=self.env)
        self.started.append(worker)
        self.worker = worker
        self.spawned = time.monotonic()
        return worker

    def _worker_pids(self, processes: int) -> list[int]:
        assert self.worker is not None
        pid = self.worker.process.pid
        return children(pid) if processes > 1 else [pid]

    def _progress(self) -> float:
        return self.ledger.processed() / self.plan.messages

    def _check_time(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError(f"{self.plan.backend}: gave up waiting for {what}")

    def _phase(self, events: list[tuple[str, float]], end: float, processes: int) -> None:
        events = sorted(events, key=lambda e: e[1])
        worker = self._start(processes)
        last_kill = 0.0
        last_done, moved = -1, time.monotonic()
        while True:
            self._check_time(f"phase end at {end:.0%} (progress {self._progress():.0%})")
            if processes == 1 and worker.process.poll() is not None:
                self.report.pill_deaths += 1
                self.say(f"  worker exited {worker.process.returncode} (a pill?); starting again")
                worker.close()
                worker = self._start(processes)
            done = self.ledger.processed()
            progress = done / self.plan.messages
            starving = self.sent - done < 2 * self.plan.concurrency
            now = time.monotonic()
            if done != last_done or starving:
                last_done, moved = done, now
            self.report.longest_stall_s = max(self.report.longest_stall_s, now - moved)
            if now - moved > self.plan.stall_limit_s:
                worker = self._unstick(worker, processes, now - moved, self.sent - done)
                moved = time.monotonic()
                continue
            if starving and events and self.unsent:
                self._feed(max(20, self.plan.messages // 50))
                continue
            dry = starving and not self.unsent  # nothing left to give: attack regardless
            if not events:
                if progress >= end or dry:
                    break
                time.sleep(0.1)
                continue
            kind, at = events[0]
            if progress < at and not dry:
                time.sleep(0.05)
                continue
            pids = self._worker_pids(processes)
            if kind == "kill":
                # Kill a worker that is handling messages, not one still starting.
                if not pids or (self.ledger.calls_of(pids) == 0 and not dry):
                    time.sleep(0.05)
                    continue
                if time.monotonic() - last_kill < self.plan.kill_gap_s:
                    time.sleep(0.05)
                    continue
                time.sleep(self.rng.uniform(0, 0.3))
                victim = self.rng.choice(self._worker_pids(processes) or pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills.append((time.time(), [victim]))
                last_kill = time.monotonic()
                self.report.kills += 1
                self.report.kills_supervised += processes > 1
                self.say(f"  SIGKILL {victim} at {progress:.0%}")
                if processes == 1:
                    worker.close()
                    worker = self._start(processes)
            elif kind == "cut":
                if not self.target.connected():  # a worker starting: cut once it is connected
                    time.sleep(0.05)
                    continue
                cut = self.target.cut()
                if cut is not None:
                    self.report.cuts = (self.report.cuts or 0) + 1
                    self.report.connections_cut += cut
                    self.say(f"  cut {cut} connection(s) at {progress:.0%}")
            elif kind == "disrupt":
                pending = self.ledger.pending_retries()
                if pending == 0 and progress < 0.4 and not dry:
                    time.sleep(0.05)
                    continue
                self.say(f"  broker {self.target.disruption} at {progress:.0%}, {pending} pending")
                self.target.disrupt()
                self.report.disruption = self.target.disruption
                self.report.disruptions += 1
                self.report.retries_pending = max(self.report.retries_pending, pending)
            events.pop(0)
        # The burst, then SIGTERM in the middle of it.
        if processes == 1:
            self.target.publish([self.expected[n] for n in self.burst])
            time.sleep(self.rng.uniform(0.2, 0.8))
        self._sigterm(worker, processes)

    def _unstick(self, worker: Stalk, processes: int, stalled_s: float, waiting: int) -> Stalk:
        """A stream that stood still past the limit: name the workers, kill them, go on."""
        pids = self._worker_pids(processes)
        self.report.stuck += 1
        self.report.problems.append(
            f"no progress for {stalled_s:.0f} s with {waiting} messages waiting: worker(s)"
            f" {pids} alive but not consuming (SIGKILLed to go on; see their logs)"
        )
        self.say(f"  STUCK for {stalled_s:.0f} s: SIGKILL {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if processes == 1:
            worker.close()
            worker = self._start(processes)
        return worker

    def _sigterm(self, worker: Stalk, processes: int) -> None:
        # SIGTERM a worker that is up and handling: one a pill just killed is started again.
        while True:
            self._check_time("a worker to SIGTERM")
            if worker.process.poll() is not None:
                self.report.pill_deaths += 1
                self.say(f"  worker exited {worker.process.returncode} before SIGTERM; again")
                worker.close()
                worker = self._start(processes)
                continue
            pids = self._worker_pids(processes)
            if pids and self.ledger.calls_of(pids):
                break
            time.sleep(0.05)
        sent = time.monotonic()
        worker.signal(signal.SIGTERM)
        try:
            code = worker.process.wait(self.plan.grace_s + EXIT_SLACK_S + 30)
        except Exception:
            code = None
        took = time.monotonic() - sent
        worker.close()
        self.worker = None
        self.report.drains.append(took)
        self.say(f"  SIGTERM: exited {code} after {took:.1f} s")
        if code is None or took > self.plan.grace_s + EXIT_SLACK_S:
            self.report.problems.append(
                f"SIGTERM drain took {took:.1f} s (grace {self.plan.grace_s} s), exit {code}"
            )
        left = self.ledger.unfinished(pids)
        if left:
            self.report.problems.append(f"SIGTERM left {len(left)} handler calls unfinished")

    def _drain(self) -> None:
        for round_ in range(1, 4):
            self.report.drain_rounds = round_
            while True:
                self._check_time("the drain")
                worker = self._start(1, "--until-empty", "--allow-errors")
                try:
                    code = worker.process.wait(max(1.0, self.deadline - time.monotonic()))
                except Exception:
                    worker.close()
                    raise AssertionError(f"drain did not end:\n{worker.stderr[-3000:]}") from None
                worker.close()
                self.worker = None
                if code == 0:
                    break
                self.report.pill_deaths += 1
                self.say(f"  drain worker exited {code}; starting again")
            self._collect()
            if not self._missing():
                return
            self.say(f"  {len(self._missing())} ids not seen yet; draining again")
            time.sleep(self.plan.visibility_s + 1)

    def _collect(self) -> None:
        """Consume the error topic into ``errors-PID.db`` files, as a user of stalk would.

        Copies the reader itself routes on (to the error topic's own error topic) are read from
        there too, into ``rerouted-PID.db``: not lost, but a problem of the reader.
        """
        log = self._read_topic(self.target.errors, "errors")
        if "to error topic (" in log:  # read that one with no poison limit: find them all
            self._read_topic(f"{self.target.errors}-errors", "rerouted", "--max-retries", "10000")

    def _read_topic(self, topic: str, prefix: str, *extra: str) -> str:
        worker = Stalk(
            "run", "tests.chaos.handler:collect", *self.target.cli(),
            "--source", topic, "--until-empty", "--allow-errors", "--quiet",
            "--concurrency", "4", *extra,
            env={**self.env, "CHAOS_ERRORS_PREFIX": prefix},
        )  # fmt: skip
        self.started.append(worker)
        code = worker.wait(120)
        if code != 0:
            raise AssertionError(f"reading {topic} failed ({code}):\n{worker.stderr}")
        return worker.stderr

    def _missing(self) -> list[int]:
        done = {n for _, n, _, outcome in self.ledger.calls() if outcome == "ok"}
        copies = self.ledger.errors() + self.ledger.errors("rerouted")
        routed = {n for n, body, _ in copies if body == self.expected.get(n)}
        return [n for n in self.expected if n not in done and n not in routed]

    # -- the count -------------------------------------------------------------------------

    def _count(self) -> None:
        report, plan = self.report, self.plan
        calls = self.ledger.calls()
        errors = self.ledger.errors() + self.ledger.errors("rerouted")
        oks = Counter(n for _, n, _, outcome in calls if outcome == "ok")
        deliveries = Counter(n for _, n, _, _ in calls)
        routed: dict[int, list[tuple[bytes, dict[str, str]]]] = defaultdict(list)
        for number, body, attributes in errors:
            routed[number].append((body, attributes))
        report.lost = self._missing()
        report.duplicated = sum(count - 1 for count in oks.values() if count > 1)
        report.on_errors = len(errors)
        for number, copies in routed.items():
            kind = self.kinds.get(number)
            if kind is None:
                report.problems.append(f"unknown message on the error topic: {copies[0][0]!r}")
            elif kind != "poison":
                report.healthy_on_errors += 1
                report.duplicated += oks[number] > 0
            report.duplicated += len(copies) - 1
        for number, kind in self.kinds.items():
            if kind != "poison":
                continue
            copies = routed.get(number, [])
            reasons = [attrs.get("stalk-reason") for _, attrs in copies]
            report.pill_deliveries = max(report.pill_deliveries, deliveries[number])
            # At-least-once holds for the error topic too: a worker whose ack of the original
            # failed after the error copy was published (SQS while moto is paused) routes it
            # again on redelivery. Every copy must be a byte-identical `poison`; the extra copies
            # are already counted as duplicates above.
            identical = all(body == self.expected[number] for body, _ in copies)
            if set(reasons) == {"poison"} and identical:
                report.pills_routed += 1
            else:
                report.problems.append(f"pill {number}: on the error topic as {reasons}")
            if deliveries[number] > plan.max_retries + 1:
                report.problems.append(
                    f"pill {number} delivered {deliveries[number]} times"
                    f" (limit {plan.max_retries + 1})"
                )
        if report.healthy_on_errors:
            reasons = Counter(
                attrs.get("stalk-reason")
                for number, copies in routed.items()
                if self.kinds.get(number) != "poison"
                for _, attrs in copies
            )
            report.notes.append(
                f"{report.healthy_on_errors} healthy messages on the error topic "
                f"({dict(reasons)}): killed in flight more than max_retries + 1 times"
            )
        rerouted = self.ledger.errors("rerouted")
        if rerouted:
            reasons = Counter(attrs.get("stalk-reason") for _, _, attrs in rerouted)
            report.problems.append(
                f"{len(rerouted)} error copies were routed again ({dict(reasons)}) by the stalk"
                f" worker reading the error topic: they sit in {self.target.errors}-errors,"
                f" ids {sorted(n for n, _, _ in rerouted)[:10]}"
            )
        if report.lost:
            report.problems.append(f"lost {len(report.lost)}: {report.lost[:20]}")
            report.notes.append(f"broker state: {self.target.diagnose()}")
        # Redelivery after each kill: from the kill to the next call of each id it held.
        starts: dict[int, list[float]] = defaultdict(list)
        for _, number, started, _ in calls:
            starts[number].append(started)
        longest = None
        for killed_at, pids in self.kills:
            for number in self.ledger.unfinished(pids):
                report.in_flight_at_kills += 1
                later = [s for s in starts[number] if s > killed_at]
                if not later:
                    report.not_redelivered += 1
                    continue
                wait = min(later) - killed_at
                longest = wait if longest is None else max(longest, wait)
        report.longest_redelivery_s = longest
        if report.not_redelivered:
            report.notes.append(
                f"{report.not_redelivered} ids held by a killed worker were not handled again"
                " (routed to the error topic before the handler)"
            )
        if report.longest_stall_s > 20:
            report.notes.append(
                f"the stream stood still for {report.longest_stall_s:.0f} s with messages waiting"
                " (a broker outage, supervisor crash backoff, or a worker that stopped consuming)"
            )
        if report.disruption and report.retries_pending == 0:
            report.notes.append("no delayed retry was pending at the broker disruption")


def markdown(reports: list[Report]) -> str:
    """One Markdown table, a row per backend (the README's)."""
    lines = ["| " + " | ".join(Report.COLUMNS) + " |", "|" + "---|" * len(Report.COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in reports]
    return "\n".join(lines)


def run(plan: Plan, workdir: Path, say: Callable[[str], None] = print) -> Report:
    """Run one plan in ``workdir`` and return its report."""
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    return Driver(plan, workdir, say).run()
