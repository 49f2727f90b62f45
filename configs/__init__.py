"""Named experiment configs, installed as ``ec2moe_jax.configs``: ``small`` (the CPU model every
result builds on) states every field with a comment; ``tiny`` (tests, CI, your own text in
seconds) and ``base`` (GPU-sized) state only what differs from ``small``."""
