"""The Ray backend: one actor per CPU slot, each running the worker function on units it is sent."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable

from ..errors import ChatvecError
from ..plan.layout import Unit
from .worker import UnitResult, UnitRunner, WorkContext

IN_FLIGHT_PER_WORKER = 2  # one running, one queued behind it: backpressure without idle gaps


def init_ray(address: str | None):
    """Join `address` (or RAY_ADDRESS); else start an embedded Ray bound to 127.0.0.1, no dashboard."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # "local" starts a fresh instance rather than attaching to whatever Ray runs on this machine;
        # the variable keeps it on loopback (Ray otherwise binds to the external interface).
        address = "local"
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 configure_logging=False)
    return ray


class _Worker:
    def __init__(self, ctx: WorkContext) -> None:
        import ray

        self.runner = UnitRunner(ctx, node=ray.get_runtime_context().get_node_id())

    def run(self, unit: Unit) -> UnitResult:
        return self.runner.run(unit)


class RayBackend:
    name = "ray"

    def __init__(self, ctx: WorkContext, workers: int | None, address: str | None) -> None:
        self.ray = init_ray(address)
        slots = int(self.ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers or slots)
        actor = self.ray.remote(num_cpus=1)(_Worker)
        ctx_ref = self.ray.put(ctx)
        self.actors = [actor.remote(ctx_ref) for _ in range(self.workers)]

    def run(self, units: Iterable[Unit], on_result: Callable[[UnitResult], None]) -> None:
        queue = deque(units)
        in_flight: dict = {}
        load = {i: 0 for i in range(len(self.actors))}
        while queue or in_flight:
            for i, actor in enumerate(self.actors):
                while queue and load[i] < IN_FLIGHT_PER_WORKER:
                    in_flight[actor.run.remote(queue.popleft())] = i
                    load[i] += 1
            ready, _ = self.ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                load[in_flight.pop(ref)] -= 1
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, ChatvecError):
                        raise e.cause from None
                    raise
                on_result(result)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
