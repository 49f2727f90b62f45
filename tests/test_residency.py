"""Residency-aware pre-training (``train.residency_prob``): the masks it draws, that a masked
step really trains without the dropped experts, and that new masks compile nothing."""

import jax
import numpy as np
import pytest
from conftest import fixture_config

from ec2moe_jax.data import train_batch
from ec2moe_jax.sharding import use_mesh
from ec2moe_jax.training import build
from ec2moe_jax.training.residency import step_residency

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if "backend_compile" in event
    else None)


def test_step_masks_are_reproducible_and_bounded():
    cfg = fixture_config(train__residency_prob=1.0, train__residency_layers=1)
    k, e = cfg.model.moe.top_k, cfg.model.moe.num_experts
    masks = [step_residency(cfg.train, cfg.model, s) for s in range(50)]
    # A function of (seed, step): a resumed run draws the same masks.
    np.testing.assert_array_equal(masks[7], step_residency(cfg.train, cfg.model, 7))
    for m in masks:
        assert m.shape == (cfg.model.num_layers, e)
        assert m[1:].all(), "only the leading residency_layers=1 layer may be masked"
        assert k <= m[0].sum() < e, "a masked layer keeps top_k..E-1 experts"
    assert len({m.tobytes() for m in masks}) > 10, "the subsets vary from step to step"
    # Probability 0: every expert at every step (the plain recipe).
    off = fixture_config()
    assert all(step_residency(off.train, off.model, s).all() for s in range(20))


def test_dense_layers_are_skipped():
    # Layer 0 dense, layer 1 MoE: "the leading MoE layer" is layer 1, never the dense one.
    cfg = fixture_config(model__moe_layers=(1,), train__residency_prob=1.0,
                         train__residency_layers=1)
    masks = [step_residency(cfg.train, cfg.model, s) for s in range(20)]
    assert all(m[0].all() and not m[1].all() for m in masks)
    with pytest.raises(ValueError, match="exceeds the model's 1 MoE layers"):
        fixture_config(model__moe_layers=(1,), train__residency_prob=1.0,
                       train__residency_layers=2)


def test_bad_residency_options_are_refused():
    with pytest.raises(ValueError, match="residency_layers=3 exceeds the model's 2 MoE"):
        fixture_config(train__residency_prob=0.5, train__residency_layers=3)
    with pytest.raises(ValueError, match="residency_prob"):
        fixture_config(train__residency_prob=1.5)


@pytest.mark.slow
def test_masked_steps_skip_dropped_experts_and_compile_once(fixture_splits):
    cfg = fixture_config(train__residency_prob=1.0, train__residency_layers=1,
                         train__weight_decay=0.0, train__warmup_steps=0)
    setup = build(cfg)
    state = setup.init_state(jax.random.key(0))
    t = cfg.train
    before = None
    with use_mesh(setup.mesh):
        for step in range(4):
            batch = train_batch(fixture_splits.train, step, batch_size=t.batch_size,
                                seq_len=t.seq_len, seed=t.seed)
            batch["allowed"] = mask = step_residency(t, cfg.model, step)
            old = jax.device_get(state.params["layer_0"]["moe"]["w_up"])
            state, metrics = setup.train_step(state, batch)
            new = jax.device_get(state.params["layer_0"]["moe"]["w_up"])
            if before is None:
                before = len(_COMPILES)
            # Adam moves a weight only where a gradient ever reached it: at step 0, the
            # dropped experts of layer 0 must stay exactly where they were.
            if step == 0:
                dropped = ~mask[0]
                assert dropped.any()
                np.testing.assert_array_equal(new[dropped], old[dropped])
                assert not np.allclose(new[mask[0]], old[mask[0]])
        jax.block_until_ready(metrics)
    assert len(_COMPILES) == before, "a new mask must not recompile the train step"
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_adapt_residency_writes_a_new_workdir_and_never_overwrites(tmp_path):
    from conftest import random_workdir

    from ec2moe_jax.cli import main
    from ec2moe_jax.training import load_params

    wd, _, params = random_workdir(str(tmp_path / "run"))
    out = str(tmp_path / "adapted")
    main(["adapt-residency", "--workdir", wd, "--out", out, "--steps", "2", "--no-progress"])
    _, adapted = load_params(out)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         params, adapted)
    assert any(jax.tree.leaves(moved)), "the fine-tune must change the LM"
    with pytest.raises(SystemExit, match="exists"):
        main(["adapt-residency", "--workdir", wd, "--out", out, "--steps", "2"])
