"""The ``sqs`` backend: Amazon SQS (and SQS-compatible servers) through boto3.

``adapter`` maps each seam operation onto SQS; ``calls`` runs boto3 off the loop; ``settle`` ends
deliveries; ``wire`` encodes bodies and attributes; ``fifo`` keeps group order across retries.
"""

from stalk.collectors.sqs.adapter import SQSAdapter
from stalk.collectors.sqs.settings import SQS_FEATURES, SQSSettings

__all__ = ["SQS_FEATURES", "SQSAdapter", "SQSSettings"]
