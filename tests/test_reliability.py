"""Nothing lost, nothing silent (issue 18): damaged checkpoints are detected and skipped,
parameters restore without the optimizer state, a re-saved step is never lost, a diverging
run stops naming the step, JSON is strict both ways, a killed run's half-written metrics line
does not break its resume, plan JSON is read strictly (with a fuzz test), and a link channel
serves a second call afresh."""

import glob
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ec2moe_jax.files import append_jsonl, read_json, read_jsonl, write_json_atomic
from ec2moe_jax.training import checkpoint as ckpt_lib
from ec2moe_jax.training.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointFallbackWarning,
    restore_tree,
    save_tree,
)


def _tree(v: float) -> dict:
    return {"w": jnp.full((32, 32), v, jnp.float32), "b": jnp.arange(8, dtype=jnp.float32) + v}


ABSTRACT = jax.eval_shape(lambda: _tree(0.0))


def _data_file(root, step: int, item: str) -> str:
    """The largest array-data file of ``item`` in checkpoint ``step`` (OCDBT ``d/`` files)."""
    files = [f for f in glob.glob(os.path.join(str(root), str(step), item, "**"), recursive=True)
             if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
    return max(files, key=os.path.getsize)


def _flip_bit(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _saved(tmp_path, steps=(1, 2), keep=2) -> Checkpointer:
    c = Checkpointer(str(tmp_path / "ck"), keep=keep)
    for s in steps:
        c.save(s, {"params": _tree(float(s)), "train": _tree(10.0 * s)})
    return c


def test_a_flipped_bit_is_detected_and_the_newest_intact_step_restored(tmp_path):
    c = _saved(tmp_path)
    damaged = _data_file(c.directory, 2, "params")
    _flip_bit(damaged)
    with pytest.warns(CheckpointFallbackWarning, match=r"step 2 .* is damaged: params/.*SHA-256"):
        out = c.restore({"params": ABSTRACT})
    assert c.restored_step == 1 and float(out["params"]["w"][0, 0]) == 1.0
    # Asked for the damaged step itself: an error naming the step and the file, no data.
    with pytest.raises(CheckpointCorruptError, match=r"step 2 .*" + os.path.basename(damaged)):
        c.restore({"params": ABSTRACT}, step=2)
    with pytest.raises(CheckpointCorruptError, match="step 2"):
        c.restore({"params": ABSTRACT}, fallback=False)


def test_a_truncated_file_is_named_in_one_short_message(tmp_path):
    c = _saved(tmp_path, steps=(1,), keep=1)
    path = _data_file(c.directory, 1, "params")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointCorruptError) as e:
        c.restore({"params": ABSTRACT})
    msg = str(e.value)
    assert "step 1" in msg and "truncated" in msg and len(msg) < 600, msg


def test_parameters_restore_without_the_optimizer_state(tmp_path):
    c = _saved(tmp_path, steps=(1,), keep=1)
    _flip_bit(_data_file(c.directory, 1, "train"))
    out = c.restore({"params": ABSTRACT})  # the damaged item is neither read nor checked
    assert c.restored_step == 1 and float(out["params"]["b"][1]) == 2.0
    with pytest.raises(CheckpointCorruptError, match="train/"):
        c.restore({"params": ABSTRACT, "train": ABSTRACT})


def test_resaving_a_step_never_loses_the_only_copy(tmp_path, monkeypatch):
    d = str(tmp_path / "codec")
    save_tree(d, _tree(1.0), step=5)  # keep=1, as the codec and gate checkpoints do
    real_write = Checkpointer._write

    def failing(manager, root, step, items):
        if root.endswith(".replacing"):
            raise OSError("disk full (injected)")
        return real_write(manager, root, step, items)

    monkeypatch.setattr(Checkpointer, "_write", staticmethod(failing))
    with pytest.raises(OSError, match="injected"):
        save_tree(d, _tree(2.0), step=5)
    monkeypatch.undo()
    assert float(restore_tree(d, ABSTRACT)["w"][0, 0]) == 1.0  # the old copy, intact
    save_tree(d, _tree(3.0), step=5)
    assert float(restore_tree(d, ABSTRACT)["w"][0, 0]) == 3.0
    assert not os.path.exists(d + ".replacing")


def test_a_resave_killed_between_its_renames_is_repaired_on_open(tmp_path, monkeypatch):
    d = str(tmp_path / "gate")
    save_tree(d, _tree(1.0), step=0)
    real_replace = os.replace
    live = os.path.join(d, "0")

    def killed_before_moving_in(src, dst):
        if dst == live:  # the old step has moved out; the staged one is about to move in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_lib.os, "replace", killed_before_moving_in)
    with pytest.raises(KeyboardInterrupt):
        save_tree(d, _tree(2.0), step=0)
    monkeypatch.undo()
    assert not os.path.exists(live)  # the window the repair closes
    assert float(restore_tree(d, ABSTRACT)["w"][0, 0]) == 2.0  # the staged copy was complete
    assert not os.path.exists(d + ".replacing")


def _poisoned_steps(monkeypatch, from_step: int) -> None:
    """Makes training diverge: from ``from_step`` (0-based) on, a step's loss and parameters
    become NaN, as an exploding update does."""
    from ec2moe_jax.training import loop

    real = loop.make_train_step

    def make(model, optimizer, moe):
        step = real(model, optimizer, moe)

        def poisoned(state, batch):
            new, metrics = step(state, batch)
            bad = state.step >= from_step
            metrics = {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}
            params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
            return new.replace(params=params), metrics

        return poisoned

    monkeypatch.setattr(loop, "make_train_step", make)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_cfg, fixture_splits, tmp_path, monkeypatch):
    from ec2moe_jax import cli
    from ec2moe_jax.training import load_params, train
    from ec2moe_jax.training.loop import TrainingDiverged

    _poisoned_steps(monkeypatch, from_step=2)
    cfg = tiny_cfg.replace(train__steps=6, train__checkpoint_every=1, train__log_every=1,
                           train__eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: loss=nan.*last good "
                                               r"checkpoint is step 2"):
        train(cfg, str(tmp_path), splits=fixture_splits, progress=False)
    assert cli._documented(TrainingDiverged("x"))  # noqa: SLF001 - `ec2moe train` exits 2
    assert not (tmp_path / "result.json").exists()
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
    # Inference restores the parameters alone: damage to the optimizer state is not read.
    _flip_bit(_data_file(tmp_path / "checkpoints", 2, "train"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointFallbackWarning)
        _, params = load_params(str(tmp_path))
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    for record in read_jsonl(tmp_path / "metrics.jsonl"):  # strict JSON, no NaN line
        assert all(not isinstance(v, float) or np.isfinite(v) for v in record.values())


@pytest.mark.slow
def test_a_killed_run_resumes_past_a_torn_metrics_line_and_a_damaged_step(
        tiny_cfg, fixture_splits, tmp_path):
    from ec2moe_jax.training import train

    cfg = tiny_cfg.replace(train__steps=4, train__checkpoint_every=1, train__eval_every=2,
                           train__log_every=1, train__keep_checkpoints=3)
    train(cfg, str(tmp_path), splits=fixture_splits, progress=False, stop_at=3)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "val_bits_per_char": 7.1')  # killed mid-write
    _flip_bit(_data_file(tmp_path / "checkpoints", 3, "params"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, str(tmp_path), splits=fixture_splits, progress=False)
    said = " | ".join(str(w.message) for w in caught)
    assert "metrics.jsonl" in said and "half-written last line" in said
    assert "step 3" in said and "damaged" in said
    assert result["steps"] == 4 and [r["step"] for r in result["curve"]] == [2, 4]
    saved = read_json(tmp_path / "result.json")
    assert saved["bits_per_char_test"] == pytest.approx(result["bits_per_char_test"])
    assert os.path.isdir(tmp_path / "checkpoints.damaged" / "3")  # kept aside, not deleted
    assert len(read_jsonl(metrics)) == len(open(metrics).read().splitlines())


def test_json_is_strict_both_ways(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"ok": 1.0})
    with pytest.raises(ValueError, match=r"result\.json.*curve\[1\]\.val is not a finite"):
        write_json_atomic(path, {"curve": [{"val": 1.0}, {"val": float("nan")}]})
    assert json.loads(path.read_text()) == {"ok": 1.0}  # the old content stays
    with pytest.raises(ValueError, match="step"):
        append_jsonl(tmp_path / "m.jsonl", {"step": float("inf")})
    path.write_text('{"bits_per_char_test": NaN}')
    with pytest.raises(ValueError, match=r"result\.json.*NaN is not a JSON number"):
        read_json(path, what="result JSON")
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n{"b": \n{"c": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl.*line 2"):  # not a torn last line
        read_jsonl(tmp_path / "m.jsonl")


# ---- plan JSON ----

@pytest.fixture(scope="module")
def model_cfg():
    from ec2moe_jax.config import load_config

    return load_config("tiny").model  # 2 layers, 8 experts, top-2, d_model 32


@pytest.mark.parametrize("content,message", [
    ({"split": 1, "resident": [4, 8], "swap": "false"}, "field 'swap' must be bool, got 'false'"),
    ("garbage", "is not valid JSON"),
    ([1, 2], "must hold a JSON object, got list"),
    ({"resident": 4}, "has no field 'split'"),
    ({"split": 1.0}, "field 'split' must be int, got 1.0"),
    ({"split": 1, "resident": [4, True]}, "field 'resident' must be an int or a list of ints"),
    ({"split": 1, "codec": 8}, "field 'codec' must be str"),
    ({"split": 1, "resident": [1, 8]}, "keep fewer than top_k=2"),
    ({"split": 9}, "split=9 outside"),
])
def test_plan_json_is_read_strictly_naming_file_and_field(tmp_path, model_cfg, content,
                                                          message):
    from ec2moe_jax.pipeline.plans import load_plan

    path = tmp_path / "my_plan.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match="my_plan.json") as e:
        load_plan(str(path), model_cfg)
    assert message in str(e.value)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-20, 300) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
_PLAN_VALUES = {
    "split": st.integers(-2, 4) | _JSON,
    "resident": st.integers(-1, 10) | st.lists(st.integers(-1, 10), max_size=3) | _JSON,
    "codec": st.sampled_from(["bf16", "fp32", "none", "int8-r8", "int4-r32", "fp32-r64",
                              "int8-r0", "int9-r8", "x"]) | _JSON,
    "micro_batch": st.integers(-1, 4) | _JSON,
    "swap": st.booleans() | _JSON,
}
_PLANS = _JSON | st.fixed_dictionaries({}, optional=_PLAN_VALUES)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_PLANS)
def test_fuzz_plan_json_only_raises_documented_errors(tmp_path_factory, model_cfg, plan):
    from ec2moe_jax.pipeline.plans import PipelinePlan, load_plan

    path = tmp_path_factory.mktemp("plan") / "fuzz.json"
    path.write_text(json.dumps(plan))
    try:
        got = load_plan(str(path), model_cfg)
    except ValueError as e:
        assert "fuzz.json" in str(e)
    else:  # what loads is exactly what the file says, validated
        assert isinstance(got, PipelinePlan) and got.split == plan["split"]
        assert isinstance(got.swap, bool) and got.swap == plan.get("swap", False)
        assert len(got.resident) == model_cfg.num_layers


# ---- link channel ----

def test_a_channel_serves_a_second_call_with_the_same_keys_afresh():
    from ec2moe_jax.pipeline.link import Channel, Failures
    from ec2moe_jax.profiles import link

    ch = Channel.from_profile(link("lte"), down_failures=Failures(drop=frozenset({0})))
    served = []
    for call in range(2):
        box = {}

        def serve(arrival, box=box, call=call):
            box["tok"] = call
            served.append(call)
            return arrival + 0.001

        ex = ch.round_trip(("step", 0, 1), 0.0, 100, serve, 8)
        assert box["tok"] == call  # the reply of this call, not the first call's
    # The first reply was lost and resent: still computed once per call.
    assert ex.attempts == 1 and served == [0, 1] and ch.served_count[("step", 0, 1)] == 2


def test_generate_and_score_twice_on_one_channel(tiny_pipeline):
    from ec2moe_jax.pipeline import Channel, executor
    from ec2moe_jax.profiles import link

    stages = tiny_pipeline["stages"][1]
    ch = Channel.from_profile(link("wifi"))
    prompts = np.asarray([[1, 2, 3, 4]], np.int32)
    first, _ = executor.generate(stages, prompts, 3, channel=ch)
    again, _ = executor.generate(stages, prompts, 3, channel=ch)
    np.testing.assert_array_equal(first, again)
    texts = np.asarray([[5, 6, 7, 8, 9]], np.int32)
    lp, _ = executor.score(stages, texts, channel=ch)
    lp2, _ = executor.score(stages, texts, channel=ch)
    np.testing.assert_array_equal(lp, lp2)
