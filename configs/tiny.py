"""tiny: seconds per run; the config of unit tests, CI smoke runs and a first try on your own text.

Only what differs from ``small`` is stated; every field is documented in ``small.py``.
"""

from ec2moe_jax.configs import small


def get_config() -> dict:
    cfg = small.get_config()
    cfg["model"].update(
        d_model=32,
        num_layers=2,
        num_heads=2,  # head_dim 16
        d_ff=64,
        max_seq_len=64,
    )
    cfg["model"]["moe"].update(
        expert_dim=32,
        capacity_factor=1.25,
        dispatch="einsum",  # the portable reference dispatch
    )
    cfg["train"].update(
        batch_size=8,
        seq_len=32,
        steps=20,
        warmup_steps=2,
        eval_every=10,
        eval_batches=2,
        eval_stride=None,  # non-overlapping evaluation windows
        checkpoint_every=5,
        log_every=5,
    )
    return cfg
