"""Collector adapters: one package per broker, each importing only the seam and the vocabulary.

``base`` is the seam the engine talks to; ``registry`` finds an adapter by ``--backend`` name
without importing any broker SDK; ``memory`` is the in-process adapter for engine tests.
"""
