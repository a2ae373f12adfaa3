"""The engine: every policy between an adapter and the handler, and no broker, ops or CLI.

``collector`` owns states and controls; ``intake`` brings messages in (poll or push);
``inflight`` tracks what is held; ``execution`` runs handlers; ``policy`` decides (pure);
``settle`` carries decisions out through the adapter; ``stats`` counts.
"""
