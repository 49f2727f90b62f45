"""base: a GPU-sized model (about 0.6B parameters, 32 experts); not trained on CPU.

Only what differs from ``small`` is stated; every field is documented in ``small.py``.
"""

from ec2moe_jax.configs import small


def get_config() -> dict:
    cfg = small.get_config()
    cfg["model"].update(
        d_model=1024,
        num_layers=12,
        num_heads=16,  # head_dim 64
        num_kv_heads=4,  # grouped-query attention
        d_ff=4096,  # dense layers (the first one)
        moe_layers=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],  # layer 0 dense
        max_seq_len=2048,
        dtype="bfloat16",
    )
    cfg["model"]["moe"].update(
        num_experts=32,
        expert_dim=1024,
        capacity_factor=1.25,
        shared_expert_dim=1024,  # a shared expert, Qwen2-MoE style
        shared_expert_gate=True,
        dispatch="ragged",  # dropless grouped matmul (fast on GPU/TPU)
    )
    cfg["mesh"].update(
        train_expert_shards=8,
        end_devices=1,
        cloud_devices=8,
        cloud_expert_shards=8,
    )
    cfg["train"].update(
        batch_size=64,
        seq_len=1024,
        steps=20000,
        learning_rate=1e-3,
        warmup_steps=1000,
        eval_every=1000,
        eval_batches=64,
        eval_stride=None,
        checkpoint_every=1000,
        keep_checkpoints=3,
        log_every=50,
    )
    return cfg
