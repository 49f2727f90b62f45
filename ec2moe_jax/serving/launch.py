"""Starting a cloud server from a trained workdir (``ec2moe serve`` calls :func:`serve`).

The server process loads the parameters once, places them once on its mesh (every local
device; experts sharded over the mesh's 'expert' axis) and builds the cloud side of a split
the first time a session asks for it. Link codecs come from the workdir (a fine-tuned one
saved for the split, rank and precision, else the PCA initialisation on the training text,
computed once): the same function the end client uses, so both ends hold the same weights,
and the session's codec fingerprint proves it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import jax

from ec2moe_jax.codec import CodecSpec
from ec2moe_jax.serving import protocol
from ec2moe_jax.serving.server import CloudServer, ServeOptions, log
from ec2moe_jax.serving.worker import CloudWorker, warm_up

READY = "listening on"  # the line (on stdout) that tells a parent process the port


def cloud_mesh(devices: int | None = None, expert_shards: int | None = None):
    """A ('data', 'expert') mesh over the first ``devices`` local devices (default all) with
    ``expert_shards`` on the expert axis (default: the largest power of two up to 2 that
    divides the device count).

    Raises:
      ValueError: more devices than exist, or shards that do not divide them.
    """
    from ec2moe_jax.sharding import make_mesh

    have = jax.devices()
    n = len(have) if devices is None else devices
    if not 1 <= n <= len(have):
        raise ValueError(f"--devices {n}: this process has {len(have)} devices (on CPU, "
                         f"JAX_NUM_CPU_DEVICES={n} must be set before JAX starts)")
    shards = expert_shards or (2 if n % 2 == 0 else 1)
    if n % shards:
        raise ValueError(f"--expert-shards {shards} does not divide --devices {n}")
    return make_mesh(have[:n], n // shards, shards)


def codec_source(model, params, workdir: str):
    """``(split, spec) -> codec weights or None`` for ``workdir``, cached per (split, codec);
    the training text is read only if some codec must be PCA-initialised."""
    from ec2moe_jax.data import prepare_splits
    from ec2moe_jax.pipeline import runtime
    from ec2moe_jax.pipeline.plans import PipelinePlan
    from ec2moe_jax.training import load_workdir_config

    cfg = model.cfg
    cache: dict = {}
    text: list = []

    def codec_for(split: int, spec: CodecSpec):
        if not spec.lowrank or split == 0:
            return None
        key = (split, spec.name)
        if key not in cache:
            plan = PipelinePlan("serve", split, (cfg.moe.num_experts,) * cfg.num_layers,
                                spec.name)
            try:
                codec, _ = runtime.link_codec(model, params, plan, workdir=workdir,
                                              train_tokens=text[0] if text else None)
            except ValueError:
                if text:
                    raise
                text.append(prepare_splits(load_workdir_config(workdir).data).train)
                codec, _ = runtime.link_codec(model, params, plan, workdir=workdir,
                                              train_tokens=text[0])
            cache[key] = codec
        return cache[key]

    return codec_for


def load(workdir: str, *, slots: int, devices: int | None = None,
         expert_shards: int | None = None, cache_len: int | None = None, seed: int = 0):
    """``(worker, fingerprint, codec_fingerprint)`` for a server of ``workdir``.

    Raises:
      FileNotFoundError: no trained model in ``workdir``.
    """
    from ec2moe_jax.pipeline.stages import place_params
    from ec2moe_jax.training import load_params
    from ec2moe_jax.training.workdir import params_fingerprint

    setup, params = load_params(workdir)
    model, mesh = setup.model, cloud_mesh(devices, expert_shards)
    fingerprint = params_fingerprint(params)
    codec_for = codec_source(model, params, workdir)
    worker = CloudWorker(model, place_params(model, params, mesh), mesh, slots=slots,
                         codec_for=codec_for, cache_len=cache_len, seed=seed)
    return worker, fingerprint, lambda split, spec: protocol.codec_fingerprint(
        codec_for(split, spec))


async def _serve(server: CloudServer, ready_file: str | None) -> None:
    grpc_server, port = await server.start()
    o = server.options
    log(f"{server.num_layers}-layer model, {o.slots} slots, ttl {o.ttl_s:g} s, batch wait "
        f"{o.batch_wait_s * 1e3:g} ms, messages up to {server.message_limit:,} bytes"
        + (", token auth" if o.token else "") + (", TLS" if o.tls else "")
        + (f", metrics on :{server.metrics_port}" if o.metrics_port is not None else ""))
    print(f"{READY} {o.host}:{port}", flush=True)
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(ready_file + ".tmp", ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log("stopping (in-flight calls get 1 s)")
    await server.stop(grpc_server, 1.0)


def serve(workdir: str, options: ServeOptions, *, devices: int | None = None,
          expert_shards: int | None = None, warm: list[tuple[int, str]] = (),
          warm_prompt: int = 0, ready_file: str | None = None, cache_len: int | None = None,
          seed: int = 0) -> None:
    """Loads ``workdir`` and serves it until SIGINT/SIGTERM.

    Args:
      options: bind address, slots, limits, auth (:class:`~.server.ServeOptions`).
      warm: (split, codec name) groups to compile before listening (greedy).
      warm_prompt: also compile the prefill of this prompt length for them.
      ready_file: once listening, the bound port is written there (atomically).
      cache_len: positions a session may hold (default the model's max_seq_len).
    """
    log(f"loading {workdir}")
    worker, fingerprint, codec_fp = load(workdir, slots=options.slots, devices=devices,
                                         expert_shards=expert_shards, cache_len=cache_len,
                                         seed=seed)
    if warm:
        log(f"compiling {len(warm)} group(s) for {len(worker.capacities)} batch sizes")
        keys = [(s, "bf16" if s == 0 else CodecSpec.parse(c).name, 0.0) for s, c in warm]
        warm_up(worker, keys, [warm_prompt] if warm_prompt else [])
    server = CloudServer(worker, fingerprint, codec_fp, options)
    try:
        asyncio.run(_serve(server, ready_file))
    finally:
        sys.stderr.flush()
