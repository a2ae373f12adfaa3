"""``python -m benchmarks``: the engine table; each backend has ``python -m benchmarks.<name>``."""

from benchmarks.engine import main

main()
