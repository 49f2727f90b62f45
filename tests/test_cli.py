"""The ``ec2moe`` command line: help, one-line errors, default workdirs, and (slow) a tiny model
trained on a text file written here running every model subcommand.

Help and error tests run ``python -m ec2moe_jax`` in subprocesses, so the real entry point
(argument parsing, exit status, stderr) is what they check.
"""

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from ec2moe_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
SUBCOMMANDS = sorted(cli.parser()._subparsers._group_actions[0].choices)  # noqa: SLF001


def ec2moe(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "ec2moe_jax", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_every_subcommand():
    out = ec2moe("--help")
    assert out.returncode == 0, out.stderr
    for name in ("train", "generate", "score", "eval", "demo", "bench", "calibrate",
                 "convert-hf", "hf-parity", "codec-sweep", "hlggn-eval", "gate",
                 "scheduler-report", "bench-scheduler", "bench-moe-layer",
                 "pipeline-calibration", "demo-pipeline", "serve", "bench-serving",
                 "adapt-residency", "bench-quality-memory"):
        assert name in SUBCOMMANDS
        assert f"    {name}" in out.stdout, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_shows_defaults(name):
    out = ec2moe(name, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: ec2moe {name}")
    assert "(default: " in out.stdout
    assert "(default: None)" not in out.stdout and "(default: False)" not in out.stdout


def _one_line_error(out, command: str) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"ec2moe {command}: error: "), lines[0]
    return lines[0]


def test_misspelled_set_key_names_the_key_and_a_suggestion(tmp_path):
    out = ec2moe("train", "--config", "tiny", "--set", "train.stpes=5", "--workdir",
                 str(tmp_path / "run"))
    line = _one_line_error(out, "train")
    assert "train.stpes" in line and "train.steps" in line
    assert not (tmp_path / "run").exists()  # nothing trained


def test_value_error_is_one_line_and_debug_shows_the_traceback():
    line = _one_line_error(ec2moe("train", "--config", "no-such-config"), "train")
    assert "no-such-config" in line
    for args in (("--debug", "train", "--config", "no-such-config"),
                 ("train", "--config", "no-such-config", "--debug")):
        out = ec2moe(*args)
        assert out.returncode != 0
        assert "Traceback (most recent call last)" in out.stderr
        assert "ValueError" in out.stderr and "no-such-config" in out.stderr


def test_missing_default_workdir_lists_trained_runs_and_the_command(tmp_path):
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    line = _one_line_error(ec2moe("eval", cwd=tmp_path), "eval")
    assert "runs/small" in line and "runs/demo" in line
    assert "runs/mine" in line and "ec2moe demo" in line


def test_default_workdir_prefers_small_then_demo(tmp_path, monkeypatch):
    from ec2moe_jax.cli import _common

    monkeypatch.chdir(tmp_path)
    for name in ("small", "demo"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="runs/demo, runs/small"):
        _common.default_workdir()  # trained but unfinished runs are listed, not chosen
    (tmp_path / "runs" / "demo" / "result.json").write_text("{}")
    assert _common.default_workdir() == os.path.join("runs", "demo")
    (tmp_path / "runs" / "small" / "result.json").write_text("{}")
    assert _common.default_workdir() == os.path.join("runs", "small")


def test_plan_is_described_in_words():
    from ec2moe_jax.cli.infer import describe_plan

    split = {"split": 1, "resident": [5, 8], "codec": "int8-r16", "micro_batch": 2,
             "swap": False}
    text = describe_plan(split, num_experts=8)
    assert "split after layer 1 of 2" in text and "[5] of 8" in text
    assert "rank 16 with int8" in text and "micro-batch 2" in text
    swap = {"split": 2, "resident": [4, 4], "codec": "none", "micro_batch": 1, "swap": True}
    assert describe_plan(swap, 8) == ("end-only (all 2 layers on the end); resident experts "
                                      "per end layer [4, 4] of 8 (the others swapped in from "
                                      "storage when chosen); micro-batch 1")
    assert describe_plan({**swap, "split": 0}, 8).startswith("cloud-only")


def _text_file(path) -> str:
    """About 24 KB of play-like text from a fixed seed: enough for contiguous val/test splits
    of the tiny config's 32-byte windows."""
    rng = random.Random(0)
    words = ("the king my lord what light is this that doth break upon the east and juliet "
             "sun fair moon speak again bright angel thou art as glorious to this night o "
             "romeo wherefore deny thy father refuse name swear love").split()
    lines = []
    while sum(map(len, lines)) < 24_000:
        lines.append(rng.choice(("KING:", "ROMEO:", "JULIET:", "NURSE:")))
        lines += [" ".join(rng.choice(words) for _ in range(rng.randint(5, 10))).capitalize()
                  + rng.choice((".", ",", "!", "?")) for _ in range(rng.randint(1, 4))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_tiny_model_on_own_text_runs_every_model_subcommand(tmp_path, capsys):
    data = _text_file(tmp_path / "mine.txt")
    wd = str(tmp_path / "run")
    plans = ("--calibration", os.path.join(RESULTS, "calibration_cpu.json"),
             "--pipeline-calibration", os.path.join(RESULTS, "pipeline_calibration.json"),
             "--codec-sweep", os.path.join(RESULTS, "codec_sweep.json"))

    result = cli.run(["train", "--config", "tiny", "--set", "train.steps=5", "--data", data,
                      "--workdir", wd, "--no-progress"])
    assert result["steps"] == 5 and math.isfinite(result["bits_per_char_test"])
    assert os.path.isfile(os.path.join(wd, "result.json"))

    # The default length shrinks (announced) to what max_seq_len 64 leaves after the prompt.
    text = cli.run(["generate", "--workdir", wd, "--prompt", "KING:"])
    assert text.startswith("KING:") and len(text.encode()) > len("KING:")
    assert "generating 59 tokens" in capsys.readouterr().err
    for plan in ("ec2moe", "cloud-only"):
        text = cli.run(["generate", "--workdir", wd, "--prompt", "KING:", "--plan", plan,
                        "--max-new-tokens", "6", *plans])
        assert text.startswith("KING:") and len(text) > len("KING:"), plan
        assert capsys.readouterr().out.startswith("KING:")  # streamed as it was generated

    # An explicit length that does not fit is refused on both paths, naming both numbers.
    for extra in ((), ("--plan", "cloud-only", *plans)):
        with pytest.raises(ValueError, match="--max-new-tokens 100 plus the 5-token prompt "
                                             "exceeds the model's max_seq_len 64"):
            cli.run(["generate", "--workdir", wd, "--prompt", "KING:", "--max-new-tokens",
                     "100", *extra])
    with pytest.raises(ValueError, match="prompt is empty"):
        cli.run(["generate", "--workdir", wd, "--prompt", ""])

    record = cli.run(["score", "--workdir", wd, "--json", *plans])
    assert math.isfinite(record["bits_per_char"]) and record["bits_per_char"] > 0
    assert record["summary"]["requests"] == 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bits_per_char"] == record["bits_per_char"]

    # A plan JSON (the format of generate/score --help): one end layer, a low-rank codec.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"split": 1, "resident": [4, 8], "codec": "int8-r8"}))
    record = cli.run(["score", "--workdir", wd, "--plan", str(plan), "--text", "KING: Speak."])
    assert record["plan"]["split"] == 1 and record["plan"]["codec"] == "int8-r8"
    assert record["summary"]["bytes_up"] > 0 and math.isfinite(record["bits_per_char"])

    record = cli.run(["eval", "--workdir", wd, "--json"])
    assert record["split"] == "test" and math.isfinite(record["bits_per_char"])


# ---- generate reads its inputs strictly (issue 18) ----

@pytest.mark.parametrize("value", ["nan", "-1", "inf", "warm"])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(value):
    out = ec2moe("generate", "--temperature", value, "--prompt", "x")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "argument --temperature" in out.stderr and value in out.stderr
    assert out.stdout == ""  # nothing generated (a NaN temperature printed NUL bytes)


@pytest.fixture(scope="module")
def untrained_workdir(tmp_path_factory):
    """The tiny model (max_seq_len 64) at its initial parameters, saved as a workdir."""
    import jax

    from ec2moe_jax.config import load_config
    from ec2moe_jax.models.lm import MoELM, init_params
    from ec2moe_jax.sharding import unbox
    from ec2moe_jax.training.loop import save_params

    cfg = load_config("tiny")
    wd = str(tmp_path_factory.mktemp("untrained") / "run")
    # Shapes from eval_shape, values from NumPy: no initialisation to compile.
    shapes = jax.eval_shape(lambda: unbox(init_params(MoELM(cfg.model), jax.random.key(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
                          shapes)
    save_params(cfg, wd, params)
    return wd


def test_a_prompt_that_is_not_utf8_is_generated_from_its_bytes(untrained_workdir, capsys):
    # Python hands argv bytes that are not UTF-8 over as surrogate escapes, as here.
    prompt = "AB" + b"\xff\xfe".decode("utf-8", "surrogateescape") + "C"
    text = cli.run(["generate", "--workdir", untrained_workdir, "--prompt", prompt,
                    "--max-new-tokens", "3"])
    assert text.startswith("AB\ufffd\ufffdC")  # printable: the bad bytes shown as U+FFFD
    assert capsys.readouterr().out.startswith("AB\ufffd\ufffdC")


@pytest.mark.parametrize("extra", [(), ("--max-new-tokens", "5"), ("--plan", "cloud-only")])
def test_a_prompt_longer_than_the_model_is_named_as_the_problem(untrained_workdir, extra):
    with pytest.raises(ValueError, match="the prompt is 100 tokens long, but the model's "
                                         "max_seq_len 64"):
        cli.run(["generate", "--workdir", untrained_workdir, "--prompt", "x" * 100, *extra])
