"""Training: no recompiles, learning, orbax round trips (other mesh too), exact resume, CLIs."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from ec2moe_jax.sharding import make_mesh, use_mesh
from ec2moe_jax.training import Checkpointer, build, load_params, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params_equal(a, b):
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


@pytest.mark.slow
def test_second_train_step_compiles_nothing(tiny_cfg, fixture_splits):
    from ec2moe_jax.data import train_batch

    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    setup = build(tiny_cfg)  # the jitted, sharded, donating step the training loop uses
    state = setup.init_state(jax.random.key(0))
    t = tiny_cfg.train
    batches = [train_batch(fixture_splits.train, i, batch_size=t.batch_size, seq_len=t.seq_len,
                           seed=0) for i in range(3)]
    with use_mesh(setup.mesh):
        state, _ = setup.train_step(state, batches[0])
        assert compiles, "the listener must see the first step compile"
        first = len(compiles)
        for batch in batches[1:]:  # new values, same shapes: nothing is traced or compiled
            state, metrics = setup.train_step(state, batch)
        jax.block_until_ready(metrics)
    assert len(compiles) == first
    # The same check through chex: a traced-count guard on the step function itself.
    from ec2moe_jax.training.steps import make_optimizer, make_train_step

    guarded = chex.assert_max_traces(
        make_train_step(setup.model, make_optimizer(t), tiny_cfg.model.moe), n=1)
    step = jax.jit(guarded, in_shardings=(setup.state_shardings, None),
                   out_shardings=(setup.state_shardings, None))
    with use_mesh(setup.mesh):
        for batch in batches:
            state, _ = step(state, batch)


@pytest.mark.slow
def test_training_reduces_loss_and_writes_metrics(tiny_cfg, fixture_splits, tmp_path):
    cfg = tiny_cfg.replace(train__steps=30, train__eval_every=30, train__log_every=5)
    result = train(cfg, str(tmp_path), splits=fixture_splits, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["nll"] for r in records if "nll" in r]
    assert losses[-1] < losses[0] - 0.5  # 8.0 bits/char at init; bytes are learnable fast
    assert result["steps"] == 30 and result["tokens_seen"] == 30 * 8 * 32
    assert result["bits_per_char_test"] < 6.0
    saved = json.load(open(tmp_path / "result.json"))
    assert saved["bits_per_char_test"] == pytest.approx(result["bits_per_char_test"])


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tiny_cfg, fixture_splits, tmp_path):
    cfg = tiny_cfg.replace(train__steps=8, train__checkpoint_every=100, train__eval_every=100)
    straight = train(cfg, str(tmp_path / "a"), splits=fixture_splits, progress=False)
    first = train(cfg, str(tmp_path / "b"), splits=fixture_splits, progress=False, stop_at=3)
    assert first["steps"] == 3 and "bits_per_char_test" not in first
    resumed = train(cfg, str(tmp_path / "b"), splits=fixture_splits, progress=False)
    assert resumed["steps"] == 8
    _params_equal(straight["state"].params, resumed["state"].params)
    _params_equal(straight["state"].opt_state, resumed["state"].opt_state)


def test_checkpoint_round_trip_and_restore_onto_another_mesh(
    tiny_cfg, fixture_splits, tmp_path, devices
):
    cfg = tiny_cfg.replace(train__steps=3, train__eval_every=100)
    result = train(cfg, str(tmp_path), splits=fixture_splits, progress=False)
    # Trained on (data=8, expert=1); restore with experts split over a 2x4 mesh.
    other = make_mesh(devices[:8], data=2, expert=4)
    setup, params = load_params(str(tmp_path), mesh=other)
    _params_equal(result["state"].params, params)
    w = params["layer_0"]["moe"]["w_gate"]
    assert w.sharding.mesh.shape["expert"] == 4 and w.addressable_shards[0].data.shape[0] == 2
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), create=False)
    assert ckpt.latest_step() == 3


def test_resume_refuses_a_different_run_and_resaving_a_step_works(
    tiny_cfg, fixture_splits, tmp_path
):
    cfg = tiny_cfg.replace(train__steps=4, train__eval_every=100)
    train(cfg, str(tmp_path), splits=fixture_splits, progress=False, stop_at=2)
    # The message names each differing field with both values, and nothing else.
    with pytest.raises(ValueError, match=r"different run \(saved -> now: model.moe.num_experts: "
                                         r"8 -> 4; train.learning_rate: 0.003 -> 0.01\)"):
        train(cfg.replace(train__learning_rate=1e-2, model__moe__num_experts=4), str(tmp_path),
              splits=fixture_splits, progress=False)
    with pytest.raises(ValueError, match="train.steps=4; resume it with at least that many"):
        train(cfg.replace(train__steps=3), str(tmp_path), splits=fixture_splits, progress=False)
    # Evaluation cadence may change between runs; the trajectory may not.
    done = train(cfg.replace(train__eval_every=50), str(tmp_path), splits=fixture_splits,
                 progress=False)
    assert done["steps"] == 4
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(4, {"x": np.zeros(3)})  # the step exists already: replaced, not an error
    assert ckpt.latest_step() == 4


def test_a_finished_run_extends_at_its_final_learning_rate(tiny_cfg, fixture_splits, tmp_path):
    from ec2moe_jax.training import load_workdir_config
    from ec2moe_jax.training.steps import learning_rate_schedule

    cfg = tiny_cfg.replace(train__steps=3, train__warmup_steps=1, train__eval_every=100)
    first = train(cfg, str(tmp_path), splits=fixture_splits, progress=False)
    assert first["steps"] == 3 and "bits_per_char_test" in first
    more = train(cfg.replace(train__steps=5), str(tmp_path), splits=fixture_splits,
                 progress=False)
    assert more["steps"] == 5 and int(more["state"].step) == 5
    saved = load_workdir_config(str(tmp_path)).train
    assert (saved.steps, saved.schedule_steps) == (5, 3)
    # The schedule still spans the first 3 steps; steps 3 and 4 run at its final rate.
    sched = learning_rate_schedule(saved)
    final = saved.learning_rate * saved.min_lr_ratio
    assert float(sched(2)) > final and float(sched(3)) == float(sched(4)) == pytest.approx(final)
    # Resuming the extended run with the same flags continues it, without re-extending.
    again = train(cfg.replace(train__steps=5), str(tmp_path), splits=fixture_splits,
                  progress=False)
    assert again["steps"] == 5 and load_workdir_config(str(tmp_path)).train.schedule_steps == 3


def test_missing_checkpoint_directory_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_params(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpointer(str(missing / "checkpoints"), create=False)


def test_batch_not_divisible_by_data_axis(tiny_cfg, devices):
    with pytest.raises(ValueError, match="batch_size=6 not divisible"):
        build(tiny_cfg.replace(train__batch_size=6))


@pytest.mark.slow
def test_train_and_infer_command_lines(tmp_path):
    corpus = os.path.join(ROOT, "tests", "fixtures", "corpus")
    data = ",".join(os.path.join(corpus, n) for n in ("a.txt", "b.txt"))
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, check=True,
                                    capture_output=True, text=True, timeout=600)
    wd = str(tmp_path / "run")
    run("train/main.py", "--config", "tiny", "--workdir", wd, "--steps", "4", "--data", data,
        "--no-progress")
    out = run("infer/main.py", "eval", "--workdir", wd, "--json").stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert record["split"] == "test" and np.isfinite(record["bits_per_char"])
    text = run("infer/main.py", "generate", "--workdir", wd, "--prompt", "KING:",
               "--max-new-tokens", "20").stdout
    assert text.startswith("KING:") and len(text) > len("KING:")
