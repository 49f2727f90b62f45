"""HL-GGN group gate: pure maths by hand, properties of routing through the gate, gradient
checks of the fusion, and training/evaluation through a tiny split LM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from ec2moe_jax import data as data_lib
from ec2moe_jax.profiles import device
from ec2moe_jax.routing import group_gate as gg
from ec2moe_jax.routing import top_k_route
from ec2moe_jax.selection import select_for_profile
from ec2moe_jax.training import gate as gate_lib

D, E, P = 16, 8, 5


def _params(seed, p=P, e=E):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"w_local": jax.random.normal(k[0], (p, e)),
            "bias": 0.1 * jax.random.normal(k[1], (e,)),
            "temperature": 0.3 * jax.random.normal(k[2], ()),
            "prior_weight": 0.5 * jax.random.normal(k[3], ())}


def test_flops_and_hand_computed_fusion():
    assert gg.router_flops(256, 8) == 4096.0
    assert gg.gate_flops(64, 4) == 2 * 64 * 4 + 12
    # A fresh gate (temperature 0 -> softplus shift gives 1, no prior, no bias) is exactly
    # its local scores.
    params = {"w_local": jnp.eye(3, 4), "bias": jnp.zeros(4), "temperature": jnp.zeros(()),
              "prior_weight": jnp.zeros(())}
    x = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    out = gg.group_gate_logits(params, x, jnp.array([0, 2, 4]), jnp.log(jnp.full(4, 0.25)))
    np.testing.assert_allclose(out, [[1.0, 3.0, 5.0, 0.0]], rtol=1e-6)


def test_least_squares_fit_recovers_the_router_on_all_inputs():
    rng = np.random.default_rng(0)
    router = rng.normal(size=(D, E))
    x = rng.normal(size=(400, D))
    allowed = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    idx = gg.choose_inputs(router, allowed, D)
    np.testing.assert_array_equal(idx, np.arange(D))
    w = gg.fit_local_gate(x[:, idx], x @ router, allowed, ridge=0.0)
    assert np.all(w[:, ~allowed] == 0)
    want = (x @ router)[:, allowed]
    got = (x @ w)[:, allowed]
    # Softmax ignores a per-token shift: compare centred logits.
    np.testing.assert_allclose(got - got.mean(-1, keepdims=True),
                               want - want.mean(-1, keepdims=True), atol=1e-4)


def test_choose_inputs_prefers_coordinates_that_move_resident_logits():
    router = np.zeros((4, 3))
    router[2] = [1.0, -1.0, 0.0]  # coordinate 2 separates experts 0 and 1
    router[0] = [0.0, 0.0, 5.0]  # coordinate 0 only moves expert 2 (not resident)
    router[3] = [0.2, 0.2, 0.0]  # coordinate 3 shifts both equally: no information
    assert gg.choose_inputs(router, np.array([True, True, False]), 1).tolist() == [2]
    with pytest.raises(ValueError, match="num_inputs"):
        gg.choose_inputs(router, np.array([True, True, False]), 5)


def test_distillation_and_recall_by_hand():
    allowed = jnp.array([True, False, True])
    z = jnp.array([[2.0, 9.0, 0.0]])
    assert float(gg.distillation_loss(z, z + 3.0, allowed)) == pytest.approx(0.0, abs=1e-6)
    # Target over allowed is softmax([2, 0]); a uniform gate pays KL = log 2 - H(target).
    p = jax.nn.softmax(jnp.array([2.0, 0.0]))
    want = float(jnp.sum(p * jnp.log(p)) + jnp.log(2.0))
    got = float(gg.distillation_loss(z, jnp.zeros((1, 3)), allowed))
    assert got == pytest.approx(want, rel=1e-5)
    full = jnp.array([[0, 1], [2, 3]])
    gate = jnp.array([[1, 2], [2, 0]])
    valid = jnp.array([[True, True], [True, False]])
    # Token 0 matches expert 1 (1 of 2); token 1 matches expert 2 (1 of 2).
    assert float(gg.recall_at_k(full, gate, valid)) == pytest.approx(0.5)


@functools.partial(jax.jit, static_argnums=3)
def _gate_route(seed, mask_bits, params, k):
    allowed = (mask_bits >> jnp.arange(E)) & 1 == 1
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), seed), (2, 6, D))
    prior = jnp.log(jax.random.dirichlet(jax.random.fold_in(jax.random.key(2), seed),
                                         jnp.ones(E)))
    logits = gg.group_gate_logits(params, x, jnp.arange(P) * 3, prior)
    return allowed, top_k_route(logits, top_k=k, allowed=allowed, renormalize=True)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 1000), mask_bits=st.integers(1, 2**E - 1), k=st.integers(1, 3))
def test_gate_routing_never_leaves_the_resident_group(seed, mask_bits, k):
    allowed, route = _gate_route(seed, mask_bits, _params(seed), k)
    chosen = np.asarray(route.expert_index)[np.asarray(route.valid)]
    assert np.all(np.asarray(allowed)[chosen])  # a masked expert is never chosen
    w = np.asarray(route.combine_weights)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # over the chosen experts
    assert np.all(w[~np.asarray(route.valid)] == 0)


def test_gate_is_jit_equal():
    x = jax.random.normal(jax.random.key(0), (3, D))
    inputs, prior = jnp.array([0, 3, 5, 7, 11]), jnp.log(jnp.full(E, 1 / E))
    args = (_params(1), x, inputs, prior)
    np.testing.assert_allclose(jax.jit(gg.group_gate_logits)(*args),
                               gg.group_gate_logits(*args), rtol=1e-6, atol=1e-6)


def test_fusion_gradients_are_finite_and_correct():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (4, D), jnp.float64)
        inputs, prior = jnp.array([0, 3, 5, 7, 11]), jnp.log(jnp.full(E, 1 / E))
        allowed = jnp.arange(E) < 5
        router = jax.random.normal(jax.random.key(1), (D, E), jnp.float64)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), _params(2))

        def loss(params):
            logits = gg.group_gate_logits(params, x, inputs, prior)
            return gg.distillation_loss(x @ router, logits, allowed)

        grads = jax.grad(loss)(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        check_grads(loss, (params,), order=1, modes=["fwd", "rev"])


@pytest.fixture(scope="module")
def tiny_split(request):
    from ec2moe_jax.config import load_config
    from ec2moe_jax.models import MoELM, init_params
    from ec2moe_jax.models.costs import model_costs
    from ec2moe_jax.sharding import unbox

    cfg = load_config("tiny").model
    model = MoELM(cfg)
    params = unbox(init_params(model, jax.random.key(0)))
    costs = model_costs(cfg)
    freq = np.random.default_rng(0).dirichlet(np.ones(cfg.moe.num_experts),
                                              size=cfg.num_layers)
    memory = costs.embed_bytes + costs.fixed_bytes[:1].sum() + 4 * costs.expert_bytes
    sel = select_for_profile(device("laptop-cpu").with_memory(memory), freq, costs,
                             num_end_layers=1)
    tokens = np.random.default_rng(1).integers(0, 256, 4096).astype(np.uint8)
    return model, params, sel, freq, tokens


def test_gate_trains_with_the_lm_frozen_and_round_trips(tiny_split, tmp_path):
    model, params, sel, freq, tokens = tiny_split
    assert sel.num_end_layers == 1 and sel.allowed[0].sum() == 4
    spec, gates = gate_lib.init_gates(model, params, sel, freq, tokens, batches=2,
                                      batch_size=4, seq_len=16)
    assert spec.layers == (0,) and len(spec.inputs[0]) == model.cfg.d_model // 4
    assert spec.flops_ratio(model.cfg.d_model) <= 0.25
    before = jax.tree.map(np.asarray, params)
    trained, history = gate_lib.train_gates(model, params, spec, gates, tokens, steps=3,
                                            batch_size=4, seq_len=16, seed=5, progress=False,
                                            checkpoint_dir=str(tmp_path / "gate"))
    assert all(np.isfinite(h["loss"]) for h in history)
    # The training loss fell: the objective on the very batches trained on, before vs after.
    # (history's first and last entries are different batches, whose difference is noise.)
    # A random LM on random bytes leaves the gate little to win (about 2e-4 here, mostly the
    # load-balancing term), but float32 noise is 1e-6, and zero or wrong-signed updates fail.
    loss_fn = jax.jit(gate_lib.make_gate_loss(model, spec))
    seen = [data_lib.train_batch(tokens, i, batch_size=4, seq_len=16, seed=5) for i in range(3)]
    before_loss = np.mean([float(loss_fn(gates, params, b)[0]) for b in seen])
    after_loss = np.mean([float(loss_fn(trained, params, b)[0]) for b in seen])
    assert after_loss < before_loss - 2e-5, (before_loss, after_loss)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), gates, trained)
    assert any(jax.tree.leaves(changed))
    back = gate_lib.load_gates(str(tmp_path / "gate"), trained)
    jax.tree.map(np.testing.assert_array_equal, back, trained)
    # The gated end layer only ever routes to resident experts.
    batch = jnp.asarray(tokens[:64].reshape(4, 16).astype(np.int32))
    _, routes, _ = gate_lib.split_forward(model, params, batch, spec, trained)
    chosen = np.asarray(routes[0].expert_index)[np.asarray(routes[0].valid)]
    assert np.all(sel.allowed[0][chosen])
    out = gate_lib.evaluate_split(model, params, spec, trained, tokens, "gate", batch_size=4,
                                  seq_len=16, max_batches=2)
    full = gate_lib.evaluate_split(model, params, spec, None, tokens, "full", batch_size=4,
                                   seq_len=16, max_batches=2)
    assert full["recall_at_k"] == pytest.approx(1.0)  # the full router agrees with itself
    assert 0.0 <= out["recall_at_k"] <= 1.0 and np.isfinite(out["bits_per_char"])
