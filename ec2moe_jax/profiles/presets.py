"""Device and link presets from public spec sheets (figures are peaks, not measurements).

Each entry names its source. FP32 peaks that a sheet does not print are derived from the
printed core counts and clocks (cores x 2 FLOP per FMA x clock), and the derivation is given.
"""

from __future__ import annotations

from ec2moe_jax.profiles.device import DeviceProfile, LinkProfile

GB = 1e9
GiB = 1024**3

DEVICES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            "jetson-orin-nano-8gb", memory_bytes=8 * GiB, peak_flops=1.28e12,
            mem_bandwidth=68 * GB, dtype="float32",
            source="NVIDIA Jetson Orin Nano 8GB module data sheet: 1024-core Ampere GPU at "
                   "625 MHz (1024 x 2 x 0.625e9 = 1.28 TFLOP/s FP32), 8 GB LPDDR5, "
                   "68 GB/s; memory shared with the CPU"),
        DeviceProfile(
            "raspberry-pi-5-8gb", memory_bytes=8 * GiB, peak_flops=153.6e9,
            mem_bandwidth=17 * GB, dtype="float32",
            source="Raspberry Pi 5 product brief: 4x Cortex-A76 at 2.4 GHz (4 cores x 2 NEON "
                   "FMA pipes x 4 fp32 lanes x 2 FLOP x 2.4e9 = 153.6 GFLOP/s), LPDDR4X-4267 "
                   "32-bit (about 17 GB/s)"),
        DeviceProfile(
            "laptop-cpu", memory_bytes=16 * GiB, peak_flops=0.5e12,
            mem_bandwidth=60 * GB, dtype="float32",
            source="a 2023 laptop class (e.g. Intel Core i7-1360P: 4 P-cores + 8 E-cores, "
                   "AVX2; about 0.5 TFLOP/s FP32 peak; LPDDR5-5200 dual channel, ~60 GB/s)"),
        DeviceProfile(
            "t4", memory_bytes=16 * GiB, peak_flops=65e12, mem_bandwidth=320 * GB,
            dtype="float16",
            source="NVIDIA T4 data sheet: 65 TFLOP/s FP16 tensor (8.1 FP32), 16 GB GDDR6, "
                   "320 GB/s"),
        DeviceProfile(
            "a100-40gb", memory_bytes=40 * GiB, peak_flops=312e12, mem_bandwidth=1555 * GB,
            dtype="bfloat16",
            source="NVIDIA A100 data sheet (SXM 40GB): 312 TFLOP/s BF16 dense tensor (19.5 "
                   "FP32), 1,555 GB/s HBM2"),
        DeviceProfile(
            "h200", memory_bytes=141 * GB, peak_flops=989e12, mem_bandwidth=4800 * GB,
            dtype="bfloat16",
            source="NVIDIA H200 data sheet (SXM): 989 TFLOP/s BF16 dense tensor (1,979 with "
                   "sparsity; 67 FP32), 141 GB HBM3e, 4.8 TB/s"),
    )
}

LINKS: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("3g", bandwidth_bps=2e6, rtt_s=0.100),
        LinkProfile("lte", bandwidth_bps=20e6, rtt_s=0.050),
        LinkProfile("wifi", bandwidth_bps=100e6, rtt_s=0.010),
        LinkProfile("5g", bandwidth_bps=100e6, rtt_s=0.020),
    )
}


def device(name: str) -> DeviceProfile:
    if name not in DEVICES:
        raise ValueError(f"unknown device preset {name!r}; known: {sorted(DEVICES)}")
    return DEVICES[name]


def link(name: str) -> LinkProfile:
    if name not in LINKS:
        raise ValueError(f"unknown link preset {name!r}; known: {sorted(LINKS)}")
    return LINKS[name]
