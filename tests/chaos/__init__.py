"""The chaos suite of issue 14: ``python -m tests.chaos [--backend B] [--short]`` (see the
README's "Zero-loss"); ``test_chaos.py`` is its short version for ``.ci/run``."""
