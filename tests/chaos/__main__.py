"""``python -m tests.chaos [--backend B ...] [--short]``: the chaos suite, one table per backend.

Exit 0 when every backend lost nothing and routed every poison pill, else 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.driver import Plan, Report, markdown, run
from tests.chaos.targets import BACKENDS


def narrate(line: str) -> None:
    print(line, flush=True)


def quiet(line: str) -> None:
    """Say nothing."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="repeatable (default: all)"
    )
    parser.add_argument("--short", action="store_true", help="the bounded version CI runs")
    parser.add_argument("--messages", "-n", type=int, help="N (default: 5000 local, 2000 brokers)")
    parser.add_argument("--kills", type=int, help="SIGKILLs per backend (default: 6; short: 5)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--verbose", "-v", action="store_true", help="narrate every attack")
    args = parser.parse_args(argv)
    reports: list[Report] = []
    for backend in args.backend or BACKENDS:
        make = Plan.short if args.short else Plan.full
        plan = make(backend, seed=args.seed, messages=args.messages)
        if args.kills is not None:
            plan.kills = args.kills
        workdir = Path(tempfile.mkdtemp(prefix=f"stalk-chaos-{backend}-"))
        print(f"chaos: {backend}: {plan.messages} messages, seed {args.seed}", flush=True)
        try:
            report = run(plan, workdir, say=narrate if args.verbose else quiet)
        except Exception as exc:  # one backend failing does not hide the others
            report = Report(backend, problems=[f"{type(exc).__name__}: {exc}"])
        reports.append(report)
        print(report.table(), flush=True)
        print(f"  ({report.elapsed_s:.0f} s; work directory {workdir})", flush=True)
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(markdown(reports))
    failed = [r.backend for r in reports if not r.ok]
    print("chaos: FAILED: " + ", ".join(failed) if failed else "chaos: lost 0 everywhere")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
