"""The Ray backend: actors spread over the cluster, each running the worker function on units it is sent.

Each actor works through its own contiguous run of units (`Runs`).
Units are retried by the driver, not by Ray: a unit whose actor died (process killed, node lost) goes back
to the front of that actor's run, which the other actors take, and the actor is replaced. `pwrite` at planned
offsets makes a rerun idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import gcpause
from ..errors import ChatvecError, RunError
from ..log import logger
from ..planning.layout import Unit
from .context_columns import pack, unpack
from .device import PIPELINE, cluster_device
from .messages import UnitResult, WorkContext
from .result_columns import pack_result, unpack_result
from .runs import Runs
from .unit_context import unit_context

if TYPE_CHECKING:
    from .worker import UnitRunner

QUEUED = 1  # units queued on an actor behind its running ones: backpressure without idle gaps
MAX_ATTEMPTS = 4  # per unit
STALL_SECONDS = 600.0  # no live worker for this long (none could be started): give up
NODES_WAIT_SECONDS = 600.0  # a cluster with no room for any worker: wait this long for its nodes to join
HEAD_LOST_SECONDS = 15.0  # the GCS unreachable this long: the head is gone (Ray itself kills the driver at 60 s)


def init_ray(address: str | None):
    """Join `address` (or RAY_ADDRESS); else start an embedded Ray bound to 127.0.0.1, no dashboard."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # "local" starts a fresh instance rather than attaching to whatever Ray runs on this machine;
        # the variable keeps it on loopback (Ray otherwise binds to the external interface).
        address = "local"
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Every result the run needs is fetched; a worker's error left unfetched belongs to work abandoned after the
    # run already failed, and Ray would print its traceback after chatvec's one-line error.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import ray

    _check_reachable(address)  # also where this process already joined a Ray: the address given must work
    if not ray.is_initialized():
        if address == "local":
            logger.info("starting an embedded Ray on 127.0.0.1 (a few seconds; --backend local skips Ray)")
        with _signals_deferred():  # Ctrl-C halfway through ray.init would leave Ray's processes orphaned
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except Exception as e:  # Ray's own errors vary by version: one line naming the usual causes
                first = (str(e).strip().splitlines() or [""])[0]
                what = "start an embedded Ray" if address == "local" else f"join the Ray cluster at {address}"
                hint = (
                    ""
                    if address == "local"
                    else (
                        "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token here too "
                        "(RAY_AUTH_TOKEN or ~/.ray/auth_token), one without needs RAY_AUTH_MODE=disabled"
                    )
                )
                raise ChatvecError(f"cannot {what} ({type(e).__name__}: {first}){hint}") from None
        protect_token(Path.home() / ".ray" / "auth_token")
    return ray


def protect_token(path: Path) -> None:
    """Ray writes its token file (~/.ray/auth_token) readable by every user of the machine: make it the owner's
    alone, or say why that cannot be done."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return  # token auth is off
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 == 0:
        return
    if st.st_uid != os.getuid():
        logger.warning(f"{path} is readable by other users and belongs to another user: `chmod 600` it")
        return
    try:
        os.chmod(path, 0o600)
    except OSError as e:
        logger.warning(
            f"{path} is readable by other users and could not be made private ({e.strerror}): `chmod 600` it"
        )


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A `host:port` address must be a Ray GCS (a gRPC server): fail in seconds, not after Ray's minutes of
    retries, nor hang for good on a port that accepts connections but is something else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "local", "auto", ray://: Ray's own handling
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            grpc = _answers_http2(conn)
    except OSError as e:
        raise ChatvecError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e} (is `ray start --head` "
            "running there, and the port open?)"
        ) from None
    if not grpc:
        raise ChatvecError(
            f"{address} accepts connections but is not a Ray cluster's GCS (no gRPC answer within {timeout:g} s): "
            "a mistyped port? `ray start --head` prints the address to use"
        )


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the server on `conn` opens an HTTP/2 session (as gRPC does): its first frame is a SETTINGS frame."""
    conn.sendall(HTTP2_PREFACE)
    head = b""
    try:
        while len(head) < 9 and (chunk := conn.recv(9 - len(head))):
            head += chunk
    except TimeoutError:
        return False
    return len(head) == 9 and head[3] == 4  # the frame type byte: 4 is SETTINGS


@contextlib.contextmanager
def _signals_deferred():
    """A first Ctrl-C (or the CLI's SIGTERM) waits until the block ends — ray.init stopped halfway leaves Ray's
    processes orphaned — then stops the run as Ctrl-C does, even if the block failed; a second one stops at once.
    Only Python handlers are deferred (an ignored or default signal stays so); all are put back after. ray.init
    would replace a deferred SIGTERM's handler with its own at its start (exit 15 mid-init): it is kept from doing
    so. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    pending: list[int] = []

    def defer(signum: int, frame: object) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in kept.items():
        if callable(handler):
            signal.signal(s, defer)
    ray_sets_sigterm = ray_utils.set_sigterm_handler
    if callable(kept[signal.SIGTERM]):
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = ray_sets_sigterm
        for s, handler in kept.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if pending:
            raise KeyboardInterrupt


def own_gpus(env: Mapping[str, str], gpu_ids: list) -> str | None:
    """CUDA_VISIBLE_DEVICES for an actor whose GPUs Ray left visible to every process (it does so where
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES is true, read as Ray reads it): its own, as Ray would have set it;
    else None. Without this, every actor on such a node would take torch's current device, GPU 0."""
    noset = env.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "").lower() in ("1", "true")
    return ",".join(str(i) for i in gpu_ids) if noset and gpu_ids else None


class _Worker:
    """A Ray actor: PIPELINE threads, each with its own runner (buffers, stream)."""

    def __init__(self, device: str) -> None:
        import ray

        self.device = device
        self.node = ray.get_runtime_context().get_node_id()
        if (visible := own_gpus(os.environ, ray.get_gpu_ids())) is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before CUDA starts in this process (on first use)
        self._local = threading.local()
        self._runners: list[UnitRunner] = []
        self._lock = threading.Lock()

    def _runner(self) -> UnitRunner:
        if not hasattr(self._local, "runner"):
            from .worker import UnitRunner  # torch: imported in the actor, never in the driver

            empty = WorkContext([], 0, {})  # each unit brings its own (`run`)
            self._local.runner = UnitRunner(empty, node=self.node, device=self.device)
            with self._lock:
                self._runners.append(self._local.runner)
        return self._local.runner

    def ready(self) -> tuple[str, str | None]:
        """Where this worker computes, and why not on a GPU `auto` offered (None if it does, or none was offered)."""
        runner = self._runner()
        return str(runner.device), runner.compute.fallback

    def run(self, unit: Unit, ctx: bytes) -> bytes:
        """Run `unit` with its own cut of the work context (exec/unit_context.py), packed by the driver; its
        result packed for the way back (exec/result_columns.py)."""
        runner = self._runner()
        with gcpause.kept():  # a 45 k-tensor unit's context: 230 k small objects, no cycle
            runner.ctx = unpack(ctx)
        return pack_result(runner.run(unit))

    def close(self) -> None:
        with self._lock:
            for runner in self._runners:
                runner.close()


class RayBackend:
    name = "ray"

    def __init__(
        self,
        ctx: WorkContext,
        workers: int | None,
        address: str | None,
        cpus_per_worker: float = 1.0,
        device: str = "auto",
    ) -> None:
        self.ray = init_ray(address)
        joined = bool(address or os.environ.get("RAY_ADDRESS"))  # an embedded Ray never grows: no wait there
        resources = self._resources(device, cpus_per_worker, NODES_WAIT_SECONDS if joined else 0.0)
        gpus = int(resources.get("GPU", 0))
        self.device = cluster_device(device, gpus)
        self.use_gpus = self.device != "cpu"
        slots = gpus if self.use_gpus else int(resources.get("CPU", 0) // cpus_per_worker)
        self.workers = max(1, workers or slots)
        if self.workers > slots:  # an autoscaling cluster may grow; any other waits on the ones that fit
            room = (
                f"{gpus} GPU(s)"
                if self.use_gpus
                else f"{resources.get('CPU', 0):g} CPU(s) at {cpus_per_worker:g} per worker"
            )
            logger.warning(
                f"{self.workers} workers asked, but the Ray cluster has room for {slots} now ({room}); the others "
                "start only if it grows"
            )
        self.warned = False
        threads = PIPELINE["cuda" if self.use_gpus else "cpu"]
        self.per_actor = threads + QUEUED
        self._actor_class = self.ray.remote(
            num_cpus=cpus_per_worker,
            num_gpus=1 if self.use_gpus else 0,
            max_concurrency=threads,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )(_Worker)
        self.ctx = ctx  # not shipped whole: each unit takes its own cut of it along (exec/unit_context.py)
        self._starting: dict = {}  # ready() ref -> actor
        self.actors: list = []
        self.replacements = 0
        self.sync_seconds = 0.0
        self.first_ready: float | None = None
        self._head = _Head(self.ray.get_runtime_context().gcs_address)
        for _ in range(self.workers):
            self._start_actor()

    def _resources(self, device: str, cpus_per_worker: float, wait: float) -> dict:
        """The cluster's resources once it can hold a worker, waiting up to `wait` seconds: a cluster just brought
        up (`ray up`) has a head with no CPU for work until its worker nodes join, and sizing the pool then would
        run one worker, on the CPU."""
        deadline, said = time.monotonic() + wait, False
        while True:
            resources = self.ray.cluster_resources()
            gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
            if gpus >= 1 or (device != "cuda" and cpus >= cpus_per_worker):
                return resources
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait:.0f} s for its worker nodes" if wait else ""
                if device == "cuda":
                    raise ChatvecError(f"--device cuda, but the Ray cluster has no GPUs{waited}")
                raise ChatvecError(
                    f"the Ray cluster has no node with {cpus_per_worker:g} CPU(s) or a GPU for a worker{waited}"
                )
            if not said:
                said = True
                logger.info("waiting for the Ray cluster's worker nodes to join (none can take a worker yet)")
            time.sleep(1.0)

    def _start_actor(self) -> None:
        actor = self._actor_class.remote(self.device)
        self._starting[actor.ready.remote()] = actor

    def run(self, units: Iterable[Unit], on_result: Callable[[UnitResult], None]) -> list[Unit]:
        """Run every unit; return those finished by workers that died later (their writes may be lost)."""
        state = _Dispatch(Runs(list(units)))
        last_progress = time.monotonic()
        while len(state.runs) or state.in_flight:
            self._hand_out(state)
            waiting = list(state.in_flight) + list(self._starting)
            ready, _ = self.ray.wait(waiting, num_returns=1, timeout=5.0) if waiting else ([], [])
            self._head.check()
            if self.actors:  # live workers with units: a slow unit (a shard downloaded first) is not a stall
                last_progress = time.monotonic()
            elif not ready and time.monotonic() - last_progress > STALL_SECONDS:
                raise RunError(f"no progress for {STALL_SECONDS:.0f} s: no Ray worker could be started or reached")
            for ref in ready:
                last_progress = time.monotonic()
                if ref in self._starting:
                    self._started(ref)
                else:
                    self._finished(ref, state, on_result)
        return state.suspect + self._flush(state.finished)

    def _hand_out(self, state: _Dispatch) -> None:
        """Keep each actor's queue full: its own run first, then half of the longest run left."""
        for actor in self.actors:
            while state.load[actor] < self.per_actor and (unit := state.runs.take(actor)) is not None:
                state.in_flight[actor.run.remote(unit, pack(unit_context(self.ctx, unit)))] = (actor, unit)
                state.load[actor] += 1

    def _started(self, ref) -> None:
        actor = self._starting.pop(ref)
        try:
            self._check_device(*self._get(ref))
        except self.ray.exceptions.RayActorError:
            self._replace(actor)
            return
        self.actors.append(actor)
        self.first_ready = self.first_ready or time.perf_counter()

    def _finished(self, ref, state: _Dispatch, on_result: Callable[[UnitResult], None]) -> None:
        """A unit's result; if its worker died, the unit goes back to be taken by another."""
        actor, unit = state.in_flight.pop(ref)
        state.load[actor] -= 1
        try:
            with gcpause.kept():  # a result of many segments: thousands of small objects, no cycle
                result = unpack_result(self._get(ref))
        except self.ray.exceptions.RayActorError as e:  # the worker process or its node died
            state.attempts[unit.id] += 1
            if state.attempts[unit.id] >= MAX_ATTEMPTS:
                raise RunError(f"unit {unit.id} failed {MAX_ATTEMPTS} times; last: {type(e).__name__}") from None
            state.runs.retry(unit, actor)
            state.suspect += state.finished.pop(actor, [])
            if actor in self.actors:
                self._replace(actor)
            return
        state.finished.setdefault(actor, []).append(unit)
        on_result(result)

    def _check_device(self, device: str, fallback: str | None) -> None:
        """Say (once) that a worker given a GPU computes on the CPU: that is slower, and usually not meant."""
        if self.use_gpus and device == "cpu" and not self.warned:
            self.warned = True
            why = fallback or "torch sees no CUDA device there (a CPU build of torch?)"
            logger.warning(
                f"a Ray worker given a GPU computes on the CPU: {why}; pass --device cpu to use a worker per CPU"
            )

    def _flush(self, finished: dict) -> list[Unit]:
        """fsync on every live worker, so that the driver's commit sees all bytes (NFS-style storage); return the
        units of workers that died before their fsync (their bytes are checked, and redone if lost)."""
        t0 = time.perf_counter()
        closing = {a.close.remote(): a for a in self.actors}
        lost: list[Unit] = []
        for ref, actor in closing.items():
            try:
                self._get(ref)
            except self.ray.exceptions.RayActorError:
                lost += finished.pop(actor, [])
                self._replace(actor)
        self.sync_seconds = time.perf_counter() - t0
        return lost

    def _get(self, ref):
        """ray.get, with a worker's own error re-raised as itself (one line, no remote traceback)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ChatvecError):
                raise e.cause from None
            raise

    def _replace(self, actor) -> None:
        """Retire a dead actor and start another; Ray places it wherever resources remain."""
        if actor in self.actors:
            self.actors.remove(actor)
        self.ray.kill(actor, no_restart=True)
        self.replacements += 1
        if self.replacements > 4 * self.workers:
            raise RunError(f"{self.replacements} Ray workers died; giving up")
        self._start_actor()

    def close(self) -> None:
        if self._head.lost:
            return  # nothing to tell a cluster that is gone (each call would wait for its GCS)
        for a in self.actors + list(self._starting.values()):
            self.ray.kill(a, no_restart=True)
        self.actors, self._starting = [], {}


@dataclass
class _Dispatch:
    """One `run`'s bookkeeping: units not handed out, those in flight, each actor's load and finished units."""

    runs: Runs
    in_flight: dict = field(default_factory=dict)  # run() ref -> (actor, unit)
    load: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    finished: dict = field(default_factory=dict)  # actor -> units it finished
    suspect: list[Unit] = field(default_factory=list)  # finished by actors that died later


class _Head:
    """Watches the cluster's GCS, so that a lost head ends the run with a clear error before Ray ends the process."""

    def __init__(self, gcs_address: str) -> None:
        host, _, port = gcs_address.rpartition(":")
        self.where = (host.strip("[]"), int(port))
        self.address = gcs_address
        self.seen = self.checked = time.monotonic()
        self.lost = False

    def check(self) -> None:
        now = time.monotonic()
        if now - self.checked < 1.0:
            return
        self.checked = now
        try:
            socket.create_connection(self.where, timeout=1.0).close()
            self.seen = now
        except OSError:
            if now - self.seen > HEAD_LOST_SECONDS:
                self.lost = True
                raise RunError(
                    f"lost the Ray cluster's head: its GCS at {self.address} has not answered for "
                    f"{HEAD_LOST_SECONDS:.0f} s; run the same command again to resume once the cluster is back"
                ) from None
