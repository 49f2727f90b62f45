"""Device/link profiles: validation with named values, presets, live measurement."""

import pytest

from ec2moe_jax.profiles import DEVICES, LINKS, DeviceProfile, LinkProfile, device, measure


@pytest.mark.parametrize("field,value,match", [
    ("memory_bytes", -1.0, "memory_bytes=-1.0 must be >= 0"),
    ("peak_flops", 0.0, "peak_flops=0.0 must be > 0"),
    ("mem_bandwidth", -5.0, "mem_bandwidth=-5.0"),
    ("load", 1.0, "load=1.0 must lie in"),
    ("peak_flops", float("nan"), "must be finite"),
])
def test_bad_device_profiles_are_named(field, value, match):
    kwargs = dict(memory_bytes=1e9, peak_flops=1e12, mem_bandwidth=1e11, load=0.0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        DeviceProfile("bad", **kwargs)


def test_bad_links_are_named():
    with pytest.raises(ValueError, match="bandwidth_bps=0"):
        LinkProfile("dead", bandwidth_bps=0, rtt_s=0.01)
    with pytest.raises(ValueError, match="rtt_s=-0.1"):
        LinkProfile("neg", bandwidth_bps=1e6, rtt_s=-0.1)
    lte = LinkProfile("x", bandwidth_bps=8e6, rtt_s=0.04)
    assert lte.transfer_seconds(1e6) == pytest.approx(1.0 + 0.02)


def test_presets_cite_sources_and_load_scales_compute():
    for name in ("jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "laptop-cpu", "a100-40gb",
                 "h200", "t4"):
        assert DEVICES[name].source
    assert set(LINKS) >= {"3g", "lte", "wifi", "5g"}
    orin = device("jetson-orin-nano-8gb").with_load(0.5)
    assert orin.available_flops == pytest.approx(0.64e12)
    with pytest.raises(ValueError, match="unknown device preset 'tpu-v9'"):
        device("tpu-v9")


def test_live_measurement_is_plausible():
    p = measure(size=256, repeats=2)
    assert p.memory_bytes > 0 and 1e8 < p.peak_flops < 1e16 and p.mem_bandwidth > 1e8
    assert 0 <= p.load < 1 and "measured" in p.source
