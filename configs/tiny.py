"""tiny: seconds per run; the config of unit tests and CI smoke runs."""


def get_config() -> dict:
    return {
        "data": {
            "source": "shakespeare",  # tests override this with a committed fixture
            "cache_dir": "~/.cache/ec2moe_jax",
            "val_fraction": 0.05,
            "test_fraction": 0.05,
        },
        "model": {
            "vocab_size": 256,
            "d_model": 32,
            "num_layers": 2,
            "num_heads": 2,  # head_dim 16
            "num_kv_heads": None,
            "head_dim": None,
            "d_ff": 64,
            "moe_layers": None,
            "max_seq_len": 64,
            "rope_theta": 10000.0,
            "norm_eps": 1e-6,
            "tie_embeddings": False,
            "dtype": "float32",
            "moe": {
                "num_experts": 8,  # divisible by every expert axis size the tests use
                "top_k": 2,
                "expert_dim": 32,
                "capacity_factor": 1.25,
                "eval_capacity_factor": None,
                "renormalize": True,
                "aux_loss_coef": 0.01,
                "z_loss_coef": 1e-3,
                "shared_expert_dim": 0,
                "shared_expert_gate": False,
                "dispatch": "einsum",
                "group_size": None,
            },
        },
        "mesh": {
            "train_expert_shards": 1,
            "end_devices": 2,
            "cloud_devices": 6,
            "cloud_expert_shards": 2,
        },
        "train": {
            "batch_size": 8,
            "seq_len": 32,
            "steps": 20,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "clip_norm": 1.0,
            "seed": 0,
            "eval_every": 10,
            "eval_batches": 2,
            "checkpoint_every": 5,
            "keep_checkpoints": 2,
            "log_every": 5,
        },
    }
