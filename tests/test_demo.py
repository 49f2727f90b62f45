"""README command 1's serving demo (``ec2moe demo`` = bench.serving_demo.run_demo): a real
server process and two client processes on 127.0.0.1 through the shaping relay, on a tiny
model with random parameters; every process is stopped when it returns."""

import json
import os

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import random_workdir

    return random_workdir(str(tmp_path_factory.mktemp("demo") / "run"))[0]


@pytest.mark.slow
def test_demo_runs_a_private_split_and_cloud_only_clients_through_one_server(workdir, tmp_path):
    from ec2moe_jax.bench import serving_demo
    from ec2moe_jax.files import write_json_atomic

    inputs = {k: os.path.join(ROOT, "results", f) for k, f in (
        ("calibration", "calibration_cpu.json"),
        ("pipeline_calibration", "pipeline_calibration.json"),
        ("codec_sweep", "codec_sweep.json"))}
    prompt, streamed, plans = [72, 101, 108, 108, 111, 44, 32, 119], [], {}
    result = serving_demo.run_demo(
        workdir, link_name="wifi", prompt=prompt, tokens=6, clients=2, inputs=inputs,
        on_plan=plans.__setitem__, on_token=streamed.append)

    private, cloud = result["clients"]
    assert (private["plan"], cloud["plan"]) == ("ec2moe-private", "cloud-only")
    # Privacy: at least one layer on the device, so hidden states (not ids) go up; the plan
    # printed before the run is the one the client ran.
    assert 1 <= private["split"] == plans["ec2moe-private"]["split"]
    assert cloud["split"] == 0 and plans["cloud-only"]["split"] == 0
    # Client 0's tokens were streamed as they arrived, and they are the ones it recorded.
    assert streamed == private["tokens"] and len(streamed) == 6
    for row in (private, cloud):
        assert row["reconnects"] == 0 and len(row["tokens"]) == 6
        assert 0 < row["ttft_s"] < 60 and row["tpot_s"]["p50"] > 0
    if private["split"] < 2:  # a served split sends more than token ids per token
        assert private["bytes_up_per_token"] > cloud["bytes_up_per_token"] > 0
    assert result["server"]["batched_steps"] > 0 and result["relay_bytes"]["up"] > 0
    out = tmp_path / "demo"
    write_json_atomic(str(out) + ".json", result)  # strict JSON: no NaN, no numpy scalars
    assert json.loads((tmp_path / "demo.json").read_text())["link"]["name"] == "wifi"
    assert os.path.getsize(serving_demo.plot_demo(result, str(out) + ".png")) > 1000


def test_demo_refuses_a_client_count_outside_its_range(workdir):
    from ec2moe_jax.bench import serving_demo

    with pytest.raises(ValueError, match="--clients 1: the demo runs 2 to 16"):
        serving_demo.run_demo(workdir, link_name="wifi", prompt=[65], tokens=2, clients=1,
                              inputs={})
