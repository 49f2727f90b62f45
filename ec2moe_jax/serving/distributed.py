"""The cloud server across several processes (JAX multi-controller, ``jax.distributed``).

One cloud spans N processes that form one global mesh: ``('data', 'expert')`` with the
expert axis over every process (each process holds 1/N of every MoE layer's experts, see
:func:`global_cloud_mesh`). In JAX every process runs the same jitted programs in the same
order, so process 0 decides and the others follow (after MaxText's API server, which forms
batches on process 0 and broadcasts them with ``multihost_utils``):

- process 0 runs the gRPC front (:class:`~.server.CloudServer`) over a :class:`CloudFront`,
  a worker that broadcasts every call (method name and arguments: which group, which
  sessions, the batch's inputs) to the other processes before running it itself;
- processes > 0 run :func:`follow`: receive a call, run the same
  :class:`~.worker.CloudWorker` method, discard its result (tokens and log-probabilities
  come out of the jitted step replicated over the 'expert' axis, so process 0 reads them
  from its own devices).

A call crosses as one fixed-size header broadcast (:data:`HEADER_BYTES`, with the call
inline when it fits) and, for a larger call, one more broadcast of the payload padded to a
power of two, so the broadcasts compile a handful of programs.

Failure: a process that dies leaves the others blocked in a collective (or ended by the
coordination service's heartbeat); :func:`launch_local` (``ec2moe serve --num-processes N``
without ``--process-id``) then restarts the whole cloud on the same port, and end clients
reconnect and replay (:mod:`~.client`). The restarts are counted in the launcher's status
JSON and exported by the new process 0 (``ec2moe_cloud_restarts``).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

HEADER_BYTES = 8192  # one broadcast per call while the call fits (decode steps do)
_LEN = 8  # the header's first bytes: the call's length, little-endian uint64
RESTARTS_ENV = "EC2MOE_CLOUD_RESTARTS"  # how many times the launcher restarted this cloud
LAUNCHER_ENV = "EC2MOE_CLOUD_LAUNCHER"  # the launcher's pid: a child exits when it is gone
FORWARDED = ("group", "admit", "release", "prefill", "step", "score")
_STOP = "stop"


def log(message: str) -> None:
    print(f"ec2moe serve: {message}", file=sys.stderr, flush=True)


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               heartbeat_s: int = 10, init_timeout_s: int = 120) -> None:
    """Joins this process to a cloud of ``num_processes`` (``jax.distributed.initialize``).

    Call before any JAX computation. On CPU, cross-process collectives use gloo (the default
    of jax 0.10's ``jax_cpu_collectives_implementation``; set explicitly where the option
    exists). ``heartbeat_s``: after this long without a peer's heartbeat the coordination
    service ends the survivors (the launcher restarts them all).

    Raises:
      ValueError: a process id outside [0, num_processes) or a coordinator not HOST:PORT.
    """
    import jax

    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must lie in [0, --num-processes "
                         f"{num_processes})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator {coordinator!r} must be HOST:PORT (process 0's "
                         "address, e.g. 10.0.0.1:8476), the same on every process")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_s)


def global_cloud_mesh(expert_shards: int | None = None):
    """A ('data', 'expert') mesh over every process's devices with the expert axis spanning
    the processes: with N processes of M devices each and ``expert_shards`` = N * e (default
    e = 2 when it divides M, else 1), process p holds expert slices [p*e, (p+1)*e) on its
    devices and the 'data' axis (M / e) stays inside each process, so anything sharded over
    'data' or replicated (tokens, log-probabilities) is whole on every process.

    Raises:
      ValueError: ``expert_shards`` not a multiple of N, or N*e not dividing N*M.
    """
    import jax

    from ec2moe_jax.sharding import make_mesh

    n, m = jax.process_count(), jax.local_device_count()
    e = (expert_shards // n if expert_shards else (2 if m % 2 == 0 else 1))
    if (expert_shards and expert_shards % n) or m % e:
        raise ValueError(f"--expert-shards {expert_shards} must be {n} processes x a divisor "
                         f"of the {m} devices per process (e.g. {n * (2 if m % 2 == 0 else 1)})")
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(n)]
    data = m // e
    flat = [by_process[p][r * e + j] for r in range(data) for p in range(n) for j in range(e)]
    return make_mesh(flat, data, n * e)


def expert_bytes(params) -> dict:
    """Bytes of the expert weights (leaves sharded over 'expert', or split one buffer per
    expert by :func:`~ec2moe_jax.layers.moe.unstack_experts` on a mesh without an 'expert'
    axis) of placed ``params``: ``{"total": one copy of every expert, "held": on this
    process's devices (replicas over 'data' included), "distinct": the distinct expert
    slices this process holds}``."""
    import jax

    from ec2moe_jax.layers.moe import UNSTACKED

    total = held = distinct = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec = getattr(leaf.sharding, "spec", ())
        split = any(getattr(k, "key", None) == UNSTACKED for k in path)
        if "expert" not in tuple(spec) and not split:
            continue
        total += leaf.nbytes
        seen = set()
        for shard in leaf.addressable_shards:
            held += shard.data.nbytes
            key = tuple((s.start, s.stop) for s in shard.index)
            if key not in seen:
                seen.add(key)
                distinct += shard.data.nbytes
    return {"total": int(total), "held": int(held), "distinct": int(distinct)}


class Channel:
    """Broadcasts calls from process 0 to every process (``multihost_utils``).

    Both directions are collectives: every process calls :meth:`send` (process 0) or
    :meth:`receive` (the others) the same number of times in the same order. The bytes are a
    pickle of (method name, arguments) made by process 0 of this same cloud and carried by
    JAX's own collectives, never by a client: the gRPC front has already checked and decoded
    every client payload into arrays.
    """

    def __init__(self):
        import jax

        self.source = jax.process_index() == 0
        self.seconds = 0.0  # time spent broadcasting (process 0's share of each call)
        self.calls = 0

    def _bcast(self, buf: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=self.source))

    def send(self, name: str, args: tuple) -> None:
        """Process 0: broadcasts one call."""
        t0 = time.perf_counter()
        body = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        head = np.zeros(HEADER_BYTES, np.uint8)
        head[:_LEN] = np.frombuffer(len(body).to_bytes(_LEN, "little"), np.uint8)
        if len(body) <= HEADER_BYTES - _LEN:
            head[_LEN:_LEN + len(body)] = np.frombuffer(body, np.uint8)
            self._bcast(head)
        else:
            self._bcast(head)
            buf = np.zeros(_bucket(len(body)), np.uint8)
            buf[:len(body)] = np.frombuffer(body, np.uint8)
            self._bcast(buf)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def receive(self) -> tuple[str, tuple]:
        """Processes > 0: the next call (blocks until process 0 sends one)."""
        head = self._bcast(np.zeros(HEADER_BYTES, np.uint8))
        n = int.from_bytes(head[:_LEN].tobytes(), "little")
        if n <= HEADER_BYTES - _LEN:
            body = head[_LEN:_LEN + n].tobytes()
        else:
            body = self._bcast(np.zeros(_bucket(n), np.uint8))[:n].tobytes()
        return pickle.loads(body)  # noqa: S301 (process 0 of this cloud; see the class)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class CloudFront:
    """Process 0's worker: each call that changes device state (:data:`FORWARDED`) is
    broadcast to every process, then run here; everything else (``groups``, ``model``,
    ``capacities``, ...) is the local :class:`~.worker.CloudWorker`'s. The seconds a
    ``prefill``/``step``/``score`` returns include its broadcast: the distributed step's
    cost as the server sees it."""

    def __init__(self, worker, channel: Channel):
        self.worker, self.channel = worker, channel

    def __getattr__(self, name):
        return getattr(self.worker, name)

    def _call(self, name: str, *args):
        t0 = self.channel.seconds
        self.channel.send(name, args)
        out = getattr(self.worker, name)(*args)
        if name in ("prefill", "step", "score"):
            out = (out[0], out[1] + self.channel.seconds - t0)
        return out

    def group(self, key):
        return self._call("group", key)

    def admit(self, key, session):
        return self._call("admit", key, session)

    def release(self, key, session):
        return self._call("release", key, session)

    def prefill(self, key, session, payload, length):
        return self._call("prefill", key, session, payload, length)

    def step(self, key, inputs):
        return self._call("step", key, inputs)

    def score(self, key, payload, targets):
        return self._call("score", key, payload, targets)

    def stop(self) -> None:
        """Ends every follower's loop (they exit their process)."""
        self.channel.send(_STOP, ())


def follow(worker, channel: Channel) -> int:
    """Processes > 0: runs process 0's calls on ``worker`` until it stops; returns the
    number of calls run. A call that raises here raised on process 0 too (the same code on
    the same inputs): it is logged and the loop goes on."""
    calls = 0
    while True:
        name, args = channel.receive()
        if name == _STOP:
            return calls
        if name not in FORWARDED:
            raise RuntimeError(f"process 0 sent an unknown call {name!r}; the processes run "
                               "different ec2moe versions?")
        try:
            getattr(worker, name)(*args)
        except Exception as e:  # noqa: BLE001 (process 0 reports it to its client)
            log(f"call {name} failed here as on process 0: {type(e).__name__}: {e}")
        calls += 1


def watch_launcher() -> None:
    """In a launched child: exits the process when the launcher is gone (a killed launcher
    must not leave a cloud behind), and leaves Ctrl-C to the launcher (which stops process
    0, which stops the others) instead of interrupting a follower inside a collective."""
    parent = os.environ.get(LAUNCHER_ENV)
    if not parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == int(parent):
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argv: Sequence[str], n: int, i: int, coordinator: str, port: int,
           ready: str | None, restarts: int) -> subprocess.Popen:
    # argparse keeps a repeated option's last value, so these override the user's.
    cmd = [sys.executable, "-m", "ec2moe_jax", "serve", *argv, "--num-processes", str(n),
           "--process-id", str(i), "--coordinator", coordinator, "--port", str(port)]
    if ready:
        cmd += ["--ready-file", ready]
    env = {**os.environ, RESTARTS_ENV: str(restarts), LAUNCHER_ENV: str(os.getpid())}
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def _end(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to process 0 (it tells the others to stop), then SIGKILL what is left."""
    if procs and procs[0].poll() is None and grace_s > 0:
        procs[0].terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


class Launcher:
    """``ec2moe serve --num-processes N`` on one machine: N processes of the cloud on
    loopback (process 0 serves gRPC on ``port``), restarted all together when any of them
    exits, on the port of the first start, so clients reconnect to the same address.

    Args:
      argv: the ``serve`` arguments every process gets (``--devices M`` fake CPU devices
        each); ``--num-processes``, ``--process-id``, ``--coordinator``, ``--port`` and
        ``--ready-file`` are added per process.
      num_processes: N.
      port: process 0's port (0: a free one, kept for the restarts).
      ready_file: the port is written here once the cloud listens (again after a restart).
      status_file: JSON of the launcher's state, rewritten at each change: ``state``
        (starting, serving, restarting, stopped, failed), ``restarts``, ``port``, ``exits``
        (process, return code, time) and ``outages_s`` (from an exit to serving again).
      max_failed_starts: consecutive starts that never serve before the launcher gives up.
    """

    def __init__(self, argv: Sequence[str], num_processes: int, *, port: int = 0,
                 ready_file: str | None = None, status_file: str | None = None,
                 max_failed_starts: int = 3, start_timeout_s: float = 600.0):
        self.argv, self.n, self.port = list(argv), num_processes, port
        self.ready_file, self.status_file = ready_file, status_file
        self.max_failed_starts, self.start_timeout_s = max_failed_starts, start_timeout_s
        self.status = {"processes": num_processes, "state": "starting", "restarts": 0,
                       "port": port or None, "exits": [], "outages_s": [],
                       "launcher_pid": os.getpid()}
        self._stop = threading.Event()
        self._private = os.path.join(
            os.path.dirname(os.path.abspath(ready_file or status_file or ".")),
            f".ec2moe-cloud-{os.getpid()}")

    def _write(self, **changes) -> None:
        from ec2moe_jax.files import write_json_atomic

        self.status.update(changes)
        if self.status_file:
            write_json_atomic(self.status_file, self.status)

    def _ready(self, path: str) -> None:
        with open(path) as f:
            self.port = int(f.read())
        if self.ready_file:
            with open(self.ready_file + ".tmp", "w") as f:
                f.write(str(self.port))
            os.replace(self.ready_file + ".tmp", self.ready_file)

    def stop(self, *_) -> None:
        self._stop.set()

    def run(self) -> int:
        """Runs the cloud until SIGINT/SIGTERM; returns 0, or 1 after too many failed
        starts."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT,
                                                                    signal.SIGTERM)}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        failed, down_since = 0, None
        while not self._stop.is_set():
            ready = f"{self._private}-{self.status['restarts']}"
            coordinator = f"127.0.0.1:{free_port()}"
            procs = [_spawn(self.argv, self.n, i, coordinator, self.port,
                            ready if i == 0 else None, self.status["restarts"])
                     for i in range(self.n)]
            log(f"cloud of {self.n} processes (pids {[p.pid for p in procs]}), coordinator "
                f"{coordinator}, restarts so far {self.status['restarts']}")
            serving = self._watch(procs, ready, down_since)
            _end(procs, 10.0 if self._stop.is_set() else 0.0)
            if os.path.exists(ready):
                os.unlink(ready)
            if self._stop.is_set():
                break
            failed = 0 if serving else failed + 1
            if failed >= self.max_failed_starts:
                self._write(state="failed")
                log(f"{failed} starts in a row never served; giving up (see the processes' "
                    "errors above)")
                return 1
            if serving:  # an outage runs from this exit until a later start serves
                down_since = time.time()
            self._write(state="restarting", restarts=self.status["restarts"] + 1)
        self._write(state="stopped")
        return 0

    def _watch(self, procs, ready: str, down_since: float | None) -> bool:
        """Waits until a process exits or the launcher stops; returns whether this start
        served."""
        serving, t0 = False, time.monotonic()
        while not self._stop.is_set():
            if not serving and os.path.exists(ready):
                serving = True
                self._ready(ready)
                outages = self.status["outages_s"] + ([round(time.time() - down_since, 3)]
                                                      if down_since is not None else [])
                self._write(state="serving", port=self.port, outages_s=outages)
                log(f"cloud serving on port {self.port}")
            dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                i, rc = dead[0]
                log(f"cloud process {i} exited with {rc}: restarting all {self.n}")
                self._write(exits=[*self.status["exits"],
                                   {"process": i, "returncode": rc, "at_unix": time.time()}])
                return serving
            if not serving and time.monotonic() - t0 > self.start_timeout_s:
                log(f"the cloud did not serve within {self.start_timeout_s:g} s: restarting")
                return False
            time.sleep(0.1)
        return serving
