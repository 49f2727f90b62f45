"""ec2moe-jax: end-cloud Mixture-of-Experts inference in JAX/Flax, after EC2MoE."""

from ec2moe_jax.config import ExperimentConfig, ModelConfig, MoEConfig, load_config
from ec2moe_jax.models import MoELM

__version__ = "0.1.0"
__all__ = ["ExperimentConfig", "MoEConfig", "MoELM", "ModelConfig", "load_config"]
