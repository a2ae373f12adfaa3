"""Operations around a running collector: control server, metrics, autoscaling, progress,
supervision of worker processes, logs, tracing and redrive. Reads what the engine counts; the
engine never imports it.
"""
