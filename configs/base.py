"""base: a GPU-sized model (about 0.6B parameters, 32 experts); not trained on CPU."""


def get_config() -> dict:
    return {
        "data": {
            "source": "shakespeare",  # or a comma-separated list of larger text files
            "cache_dir": "~/.cache/ec2moe_jax",
            "val_fraction": 0.05,
            "test_fraction": 0.05,
        },
        "model": {
            "vocab_size": 256,
            "d_model": 1024,
            "num_layers": 12,
            "num_heads": 16,  # head_dim 64
            "num_kv_heads": 4,  # grouped-query attention
            "head_dim": None,
            "d_ff": 4096,  # dense layers (the first one)
            "moe_layers": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],  # layer 0 dense
            "max_seq_len": 2048,
            "rope_theta": 10000.0,
            "norm_eps": 1e-6,
            "tie_embeddings": False,
            "dtype": "bfloat16",
            "moe": {
                "num_experts": 32,
                "top_k": 2,
                "expert_dim": 1024,
                "capacity_factor": 1.25,
                "eval_capacity_factor": None,
                "renormalize": True,
                "aux_loss_coef": 0.01,
                "z_loss_coef": 1e-3,
                "shared_expert_dim": 1024,  # a shared expert, Qwen2-MoE style
                "shared_expert_gate": True,
                "dispatch": "ragged",  # dropless grouped matmul (fast on GPU/TPU)
                "group_size": None,
            },
        },
        "mesh": {
            "train_expert_shards": 8,
            "end_devices": 1,
            "cloud_devices": 8,
            "cloud_expert_shards": 8,
        },
        "train": {
            "batch_size": 64,
            "seq_len": 1024,
            "steps": 20000,
            "learning_rate": 1e-3,
            "warmup_steps": 1000,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "clip_norm": 1.0,
            "seed": 0,
            "eval_every": 1000,
            "eval_batches": 64,
            "checkpoint_every": 1000,
            "keep_checkpoints": 3,
            "log_every": 50,
        },
    }
