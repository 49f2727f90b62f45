"""Starting a cloud server from a trained workdir (``ec2moe serve`` calls :func:`serve`).

The server process loads the parameters once, places them once on its mesh (every local
device; experts sharded over the mesh's 'expert' axis) and builds the cloud side of a split
the first time a session asks for it. Link codecs come from the workdir (a fine-tuned one
saved for the split, rank and precision, else the PCA initialisation on the training text,
computed once): the same function the end client uses, so both ends hold the same weights,
and the session's codec fingerprint proves it.

A cloud of several processes (``num_processes > 1``, :mod:`.distributed`): every process
joins ``jax.distributed`` and loads the workdir onto the global mesh; process 0 serves gRPC
over a worker that broadcasts each call, the others follow it until it stops.
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
    divides the device count). In a cloud of several processes (``jax.distributed``), every
    process's devices with the expert axis across the processes
    (:func:`~.distributed.global_cloud_mesh`).

    Raises:
      ValueError: more devices than exist, or shards that do not divide them.
    """
    from ec2moe_jax.sharding import make_mesh

    if jax.process_count() > 1:  # one cloud over several processes: every process's devices
        from ec2moe_jax.serving.distributed import global_cloud_mesh

        return global_cloud_mesh(expert_shards)
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
          seed: int = 0, num_processes: int = 1, process_id: int = 0,
          coordinator: str | None = None) -> None:
    """Loads ``workdir`` and serves it until SIGINT/SIGTERM.

    Args:
      options: bind address, slots, limits, auth (:class:`~.server.ServeOptions`).
      warm: (split, codec name) groups to compile before listening (greedy).
      warm_prompt: also compile the prefill of this prompt length for them.
      ready_file: once listening, the bound port is written there (atomically).
      cache_len: positions a session may hold (default the model's max_seq_len).
      num_processes, process_id, coordinator: one process of a cloud of several
        (``jax.distributed``; :mod:`~.distributed`): process 0 serves gRPC, the others
        follow its calls. 1 (the default): a cloud of this process alone, no
        ``jax.distributed`` at all.
    """
    if num_processes > 1:
        from ec2moe_jax.serving import distributed

        distributed.watch_launcher()
        distributed.initialize(coordinator or "", num_processes, process_id)
        log(f"process {process_id} of {num_processes}: {jax.local_device_count()} of "
            f"{jax.device_count()} devices")
    log(f"loading {workdir}")
    worker, fingerprint, codec_fp = load(workdir, slots=options.slots, devices=devices,
                                         expert_shards=expert_shards, cache_len=cache_len,
                                         seed=seed)
    from ec2moe_jax.serving.distributed import expert_bytes

    held = expert_bytes(worker.params)
    log(f"expert weights: {held['distinct']:,} of {held['total']:,} bytes on this process "
        f"({held['held']:,} with replicas over its devices)")
    if num_processes > 1:
        worker = _distributed_front(worker, process_id)
        if worker is None:  # a follower: ran process 0's calls until it stopped
            return
    if warm:
        log(f"compiling {len(warm)} group(s) for {len(worker.capacities)} batch sizes")
        keys = [(s, "bf16" if s == 0 else CodecSpec.parse(c).name, 0.0) for s, c in warm]
        warm_up(worker, keys, [warm_prompt] if warm_prompt else [])
    server = CloudServer(worker, fingerprint, codec_fp, options)
    if num_processes > 1:
        _cloud_metrics(server, worker)
    try:
        asyncio.run(_serve(server, ready_file))
    finally:
        if num_processes > 1:
            server.compute.shutdown(wait=True)  # no call in flight: the stop is the last one
            worker.stop()
        sys.stderr.flush()


def _distributed_front(worker: CloudWorker, process_id: int):
    """Process 0: the worker that forwards every call to the others
    (:class:`~.distributed.CloudFront`); other processes: follow process 0 until it stops,
    then None."""
    from ec2moe_jax.serving import distributed

    channel = distributed.Channel()
    if process_id == 0:
        return distributed.CloudFront(worker, channel)
    calls = distributed.follow(worker, channel)
    log(f"process {process_id}: process 0 stopped the cloud after {calls} calls")
    return None


def _cloud_metrics(server: CloudServer, front) -> None:
    """Prometheus gauges of a cloud of several processes, in the server's registry:
    ``ec2moe_cloud_processes``, ``ec2moe_cloud_restarts`` (the launcher's count, so an
    outage shows as a step), ``ec2moe_expert_bytes{kind}`` (this process's expert weights),
    ``ec2moe_broadcast_seconds`` and ``ec2moe_broadcast_calls`` (process 0's broadcasts)."""
    from prometheus_client import Gauge

    from ec2moe_jax.serving import distributed

    r = server.metrics.registry
    Gauge("ec2moe_cloud_processes", "processes of this cloud", registry=r).set(
        jax.process_count())
    restarts = int(os.environ.get(distributed.RESTARTS_ENV, "0"))
    Gauge("ec2moe_cloud_restarts", "times the launcher restarted this cloud",
          registry=r).set(restarts)
    g = Gauge("ec2moe_expert_bytes", "expert weight bytes on process 0", ["kind"], registry=r)
    for kind, n in distributed.expert_bytes(front.worker.params).items():
        g.labels(kind).set(n)
    Gauge("ec2moe_broadcast_seconds", "seconds process 0 spent broadcasting calls",
          registry=r).set_function(lambda: front.channel.seconds)
    Gauge("ec2moe_broadcast_calls", "calls process 0 broadcast to the other processes",
          registry=r).set_function(lambda: front.channel.calls)
    if restarts:
        log(f"this cloud was restarted {restarts} time(s) by its launcher")
