"""What crosses the link at a split: the one codec vocabulary, from the wire format up.

Shape legend: B batch, T time, D model, R codec rank.

A :class:`CodecSpec` is a precision and an optional rank. Without a rank the raw hidden state
travels (D values per token); with one, the latents of the low-rank codec
(:mod:`~ec2moe_jax.codec.lowrank`, R values per token). Its :attr:`~CodecSpec.name` is the
string plans, plan JSON files, the scheduler's codec options and reports use:

=============  ===================================================  ===============
name           what travels                                         wire kind
=============  ===================================================  ===============
``bf16``       the hidden state in bfloat16 (2 D bytes per token)   bfloat16
``fp32``       the hidden state in float32 (lossless, 4 D bytes)    float32
``int8-r64``   rank-64 latents, int8 levels + a float32 scale       int8
``int4-r96``   rank-96 latents, int4 levels + a float32 scale       int4
``fp32-r64``   rank-64 latents in float32 (codec without quantiser) float32
=============  ===================================================  ===============

Names written before this vocabulary existed: ``"none"`` (plan files, scheduler reports and
``results/*.json`` up to now) meant bf16 and is read as ``bf16``, the one alias
:meth:`CodecSpec.parse` accepts. Other old spellings ("float32", "bfloat16",
"lowrank-float32") are refused with the new name in the message.
"""

from __future__ import annotations

import dataclasses
import re

from ec2moe_jax.codec import wire

# Precision -> wire kind; quantised precisions exist only for latents (they need a rank).
_WIRE_KIND = {"bf16": "bfloat16", "fp32": "float32", "int8": "int8", "int4": "int4"}
KINDS = tuple(_WIRE_KIND)
RAW_KINDS = ("bf16", "fp32")  # may travel without a rank (the hidden state itself)
LOWRANK_KINDS = ("int8", "int4", "fp32")  # may travel as rank-R latents
ALIASES = {"none": "bf16"}  # what plans and results said before this vocabulary
_RENAMED = {"float32": "fp32", "bfloat16": "bf16", "lowrank-float32": "fp32-r<rank>"}
_NAME = re.compile(r"^(?P<kind>[a-z0-9]+)(?:-r(?P<rank>[0-9]+))?$")


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """What one split sends over the link (immutable, hashable).

    Attributes:
      kind: precision of the values on the wire: "bf16", "fp32", "int8" or "int4".
      rank: R of the low-rank codec, or None for the raw hidden state (D values per token);
        "int8"/"int4" need a rank (per-token quantisation applies to latents only).

    Raises:
      ValueError: an unknown kind, a rank < 1, or a quantised kind without a rank.
    """

    kind: str = "bf16"
    rank: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"codec kind {self.kind!r} must be one of {list(KINDS)}")
        if self.rank is None:
            if self.kind not in RAW_KINDS:
                raise ValueError(f"codec {self.kind!r} needs a rank ('{self.kind}-r<rank>'): "
                                 "quantisation applies to low-rank latents only")
        elif isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"codec {self.kind!r}: rank={self.rank!r} must be an int >= 1 "
                             "(or None for the raw hidden state)")
        elif self.kind not in LOWRANK_KINDS:
            raise ValueError(f"codec {self.kind}-r{self.rank}: low-rank latents travel as "
                             f"one of {list(LOWRANK_KINDS)}")

    @classmethod
    def parse(cls, name: str) -> CodecSpec:
        """The spec of a codec name ("bf16", "fp32", "int8-r64", "int4-r96", "fp32-r64");
        ``"none"`` is read as "bf16" (see the module docstring).

        Raises:
          ValueError: the name is not in the vocabulary; the message gives the grammar and,
            for an old spelling, its new name.
        """
        if not isinstance(name, str):
            raise ValueError(f"codec name must be a string, got {name!r}")
        name = ALIASES.get(name, name)
        grammar = ("'bf16', 'fp32' or '<int8|int4|fp32>-r<rank>' (e.g. 'int8-r64'); "
                   "'none' is read as 'bf16'")
        if name in _RENAMED:
            raise ValueError(f"codec {name!r} is now called {_RENAMED[name]!r}: {grammar}")
        m = _NAME.match(name)
        if m is None or m["kind"] not in KINDS:
            raise ValueError(f"unknown codec {name!r}: expected {grammar}")
        try:
            return cls(m["kind"], None if m["rank"] is None else int(m["rank"]))
        except ValueError as e:
            raise ValueError(f"codec {name!r}: {e}; expected {grammar}") from None

    @property
    def name(self) -> str:
        """The canonical name, e.g. "bf16" or "int8-r64"; ``parse(spec.name) == spec``."""
        return self.kind if self.rank is None else f"{self.kind}-r{self.rank}"

    @property
    def lowrank(self) -> bool:
        """Whether latents of the low-rank codec travel (the split needs codec weights)."""
        return self.rank is not None

    @property
    def quant_bits(self) -> str | None:
        """"int8"/"int4" for quantised latents (:func:`~ec2moe_jax.codec.lowrank.quantize`),
        else None."""
        return self.kind if self.kind in wire.QUANTISED else None

    @property
    def wire_kind(self) -> str:
        """The kind field of the payload (:data:`ec2moe_jax.codec.wire.KINDS`)."""
        return _WIRE_KIND[self.kind]

    def width(self, d_model: int) -> int:
        """Values per token on the wire: R for latents, D for the raw hidden state."""
        return d_model if self.rank is None else self.rank

    def check(self, d_model: int) -> CodecSpec:
        """Returns self if it fits a model of width ``d_model`` (rank <= D), else raises
        ValueError."""
        if self.rank is not None and self.rank > d_model:
            raise ValueError(f"codec {self.name!r}: rank {self.rank} exceeds the model width "
                             f"D={d_model}")
        return self

    def bytes_per_token(self, d_model: int) -> float:
        """Body bytes per token on the wire (:func:`ec2moe_jax.codec.wire.token_bytes`),
        what the scheduler's cost model charges besides each message's header."""
        return wire.token_bytes(self.wire_kind, self.width(d_model))

    def payload_bytes(self, batch: int, time: int, d_model: int) -> int:
        """Exact wire bytes of one [batch, time] hidden-state message, header included."""
        return wire.payload_bytes(self.wire_kind, batch, time, self.width(d_model))


BF16 = CodecSpec("bf16")  # the uncompressed baseline: the scheduler's codec option 0
FP32 = CodecSpec("fp32")  # the lossless hidden state (the pipeline's default transport)
