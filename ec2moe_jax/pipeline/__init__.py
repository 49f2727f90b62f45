"""The end-cloud pipeline runtime: jitted stages per submesh, link emulation, the executor
(scoring and generation) and plan plumbing."""

from ec2moe_jax.pipeline.executor import (
    Report,
    RequestStats,
    fixed_times,
    full_logits,
    generate,
    measured,
    micro_batches,
    score,
    score_overlapped,
)
from ec2moe_jax.pipeline.link import (
    BandwidthTrace,
    Channel,
    Failures,
    Link,
    LinkError,
    channel_for,
)
from ec2moe_jax.pipeline.stages import Stages, Transport, build_stages, token_message_bytes

__all__ = [
    "BandwidthTrace",
    "Channel",
    "Failures",
    "Link",
    "LinkError",
    "Report",
    "RequestStats",
    "Stages",
    "Transport",
    "build_stages",
    "channel_for",
    "fixed_times",
    "full_logits",
    "generate",
    "measured",
    "micro_batches",
    "score",
    "score_overlapped",
    "token_message_bytes",
]
