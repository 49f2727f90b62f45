"""The end-cloud pipeline runtime: jitted stages per submesh, the stage engine (the one way
to run an end or a cloud job and count its bytes), link emulation, the executor (scoring and
generation) and plan plumbing."""

from ec2moe_jax.pipeline.engine import (
    CloudEngine,
    EndEngine,
    Message,
    Sample,
    Scores,
    fixed_times,
    insert,
    measured,
)
from ec2moe_jax.pipeline.executor import (
    Report,
    RequestStats,
    full_logits,
    generate,
    micro_batches,
    score,
    score_overlapped,
)
from ec2moe_jax.pipeline.link import (
    BandwidthTrace,
    Channel,
    Drop,
    Failures,
    Link,
    LinkError,
    channel_for,
)
from ec2moe_jax.pipeline.stages import Stages, build_stages, token_message_bytes

__all__ = [
    "BandwidthTrace",
    "Channel",
    "CloudEngine",
    "Drop",
    "EndEngine",
    "Failures",
    "Link",
    "LinkError",
    "Message",
    "Report",
    "RequestStats",
    "Sample",
    "Scores",
    "Stages",
    "build_stages",
    "channel_for",
    "fixed_times",
    "full_logits",
    "generate",
    "insert",
    "measured",
    "micro_batches",
    "score",
    "score_overlapped",
    "token_message_bytes",
]
