"""Device and link profiles (one definition for selection and the scheduler), presets, and
live measurement of the machine at hand."""

from ec2moe_jax.profiles.device import DeviceProfile, LinkProfile
from ec2moe_jax.profiles.live import available_memory_bytes, cpu_load, measure
from ec2moe_jax.profiles.presets import DEVICES, LINKS, device, link

__all__ = [
    "DEVICES",
    "LINKS",
    "DeviceProfile",
    "LinkProfile",
    "available_memory_bytes",
    "cpu_load",
    "device",
    "link",
    "measure",
]
