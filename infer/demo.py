"""The README's main command: the end-cloud demo on 8 fake CPU devices (end 2, cloud 6).

  python infer/demo.py                 # about 6 minutes on 2 CPU cores the first time, 1 after

Uses the fully trained small model in runs/small if present, else trains the small config
briefly into runs/demo (once). Then it schedules EC2MoE for this CPU as the end device over
an emulated link, generates text through the split pipeline (streamed), and compares EC2MoE
with the baselines (cloud-only, end-only, best single split): measured stage compute, the
link emulated on a virtual clock, and the scheduler's predictions. Writes results/demo.json
and results/demo.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench import pipeline_demo as demo  # noqa: E402
from ec2moe_jax.bench.plots import plot_demo  # noqa: E402
from ec2moe_jax.config import load_config  # noqa: E402
from ec2moe_jax.data import ByteTokenizer, prepare_splits  # noqa: E402
from ec2moe_jax.profiles import link  # noqa: E402
from ec2moe_jax.training import train  # noqa: E402
from ec2moe_jax.training.checkpoint import write_json_atomic  # noqa: E402


def _workdir(steps: int) -> str:
    full = os.path.join("runs", "small")
    if os.path.exists(os.path.join(full, "result.json")):
        print(f"using the fully trained small model in {full}")
        return full
    workdir = os.path.join("runs", "demo")
    cfg = load_config("small").replace(train__steps=steps, train__warmup_steps=50,
                                       train__eval_every=steps, train__checkpoint_every=steps)
    if not os.path.exists(os.path.join(workdir, "result.json")):
        r = train(cfg, workdir, final_eval_batches=16)
        print(f"trained {r['steps']} steps in {r['wall_seconds']:.0f} s: "
              f"{r['bits_per_char_test']:.3f} bits/char on the first 16 test batches "
              "(measured; python train/main.py trains the full model)")
    return workdir


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300,
                    help="brief training steps (300: the whole demo stays under 10 minutes "
                         "on 2 cores with 8 fake devices)")
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--link", default="lte", help="link preset (3g, lte, wifi, 5g)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=os.path.join("results", "demo"))
    args = ap.parse_args(argv)

    workdir = _workdir(args.steps)
    tok = ByteTokenizer()
    splits = prepare_splits(load_config("small").data)
    work = demo.demo_workload(tok, splits, args.prompt, max_new_tokens=args.max_new_tokens)

    def stream(ids, tokens, t):  # request 0 of the EC2MoE plan, as its tokens arrive
        if ids[0] == 0:
            print(tok.decode([int(tokens[0])]), end="", flush=True)

    print(f"EC2MoE, streaming request 0 (link {args.link}):\n{args.prompt}", end="")
    result = demo.run_demo(workdir, link(args.link), work, temperature=args.temperature,
                           on_token=stream)
    print("\n" + "-" * 60)
    for name, toks in result.pop("_tokens").items():
        result.setdefault("samples", {})[name] = tok.decode(toks[0].tolist())
    print(f"{'plan':14} {'split':>5} {'codec':>9} {'mb':>3} {'gen lat':>8} {'TTFT':>7} "
          f"{'TPOT':>7} {'up B/req':>9} {'score lat':>9} {'bits/char':>9} {'pred gen':>8}")
    for r in result["rows"]:
        p, g, s = r["plan"], r["generate"], r["score"]
        print(f"{r['name']:14} {p['split']:5d} {p['codec']:>9} {p['micro_batch']:3d} "
              f"{g['latency_p50_s']:8.3f} {g['ttft_mean_s']:7.3f} {g['tpot_mean_s']:7.4f} "
              f"{g['bytes_up_per_request']:9.0f} {s['latency_p50_s']:9.3f} "
              f"{r['bits_per_char']:9.3f} {r['predicted_generate_s']:8.3f}")
    print(f"seconds; measured compute on this CPU + emulated link; the {len(work.prompts)} "
          "requests take turns on the same devices, so each latency holds the others' steps; "
          "'pred gen' = scheduler cost model for one request alone (calibrated per submesh)")
    write_json_atomic(args.out + ".json", result)
    png = plot_demo(result, args.out + ".png")
    print(f"wrote {args.out}.json and {png}")
    print(json.dumps({r["name"]: round(r["generate"]["latency_p50_s"], 3)
                      for r in result["rows"]}))
    return result


if __name__ == "__main__":
    main()
