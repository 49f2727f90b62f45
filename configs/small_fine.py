"""small_fine: ``small`` with fine-grained experts (32 narrow routed experts, top-4, plus one
always-on shared expert), the layout of modern MoE families (OLMoE: 64 experts top-8;
Qwen3-MoE: 128 top-8; DeepSeek-MoE and Qwen2-MoE add shared experts).

Same active expert width per token as ``small`` (shared 256 + 4 x 64 = 2 x 256) and the same
routed expert parameters (32 x 64 = 8 x 256 per layer); the shared expert adds 256 of fixed
width per layer. Only what differs from ``small`` is stated; every field is documented in
``small.py``.
"""

from ec2moe_jax.configs import small


def get_config() -> dict:
    cfg = small.get_config()
    cfg["model"]["moe"].update(
        num_experts=32,  # E: narrow experts, so one missing expert is a small share
        top_k=4,  # K
        expert_dim=64,  # F: 4 x 64 routed + 256 shared = small's 2 x 256 active width
        shared_expert_dim=256,  # always on: the end never loses it
    )
    return cfg
