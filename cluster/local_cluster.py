#!/usr/bin/env python
"""A multi-node Ray cluster on one machine, on 127.0.0.1, for trying the cluster path of `chatvec`.

Starts a head node plus N worker nodes with `ray.cluster_utils.Cluster` (each node is a separate raylet
with its own object store, so actors really are spread over "nodes"), prints the address, then either
runs a command with RAY_ADDRESS set to it or waits until Ctrl-C:

    python cluster/local_cluster.py --nodes 3 --cpus 1 -- chatvec merge --base B --chat C --cp CP --out OUT
    python cluster/local_cluster.py --nodes 3 --cpus 1          # then, in another shell, the printed exports

Why not `ray start --head` + `ray start --address` on loopback: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is
what keeps Ray on 127.0.0.1 (otherwise it rewrites 127.0.0.1 to the external interface and listens on all
interfaces), and with it `ray start --address` refuses to join. Starting every node from one process with
cluster_utils is the supported loopback path.

The head gets fast health checks (500 ms period, 2 s timeout, 5 failures), so a node removed with
`--kill-node-after` is declared dead in a few seconds instead of ~16 s, and a node merely slow on a busy machine
is not.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

MiB = 1024 * 1024
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="local_cluster.py",
        description=__doc__,
        epilog="Everything after `--` is the command to run with RAY_ADDRESS set; without one, wait until Ctrl-C.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=2, help="worker nodes besides the head (default 2)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs per worker node (default 1)")
    p.add_argument(
        "--head-cpus",
        type=int,
        default=0,
        help="CPUs on the head node (default 0: actors land on the worker nodes only)",
    )
    p.add_argument("--object-store-mib", type=int, default=150, help="object store per node, MiB (default 150)")
    p.add_argument(
        "--auth",
        choices=("disabled", "token"),
        default=os.environ.get("RAY_AUTH_MODE") or "disabled",
        help="RAY_AUTH_MODE for the cluster and the command (default: $RAY_AUTH_MODE, else disabled; "
        "token reads ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)",
    )
    p.add_argument("--address-file", help="also write the address to this file once the cluster is up")
    p.add_argument(
        "--kill-node-after",
        type=float,
        metavar="SECONDS",
        help="fault injection: remove one worker node without grace this long after the command starts "
        "(the driver's start-up, several seconds, counts: watch the progress bar to pick it)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return p


def start_cluster(nodes: int, cpus: int, head_cpus: int, object_store_mib: int):
    """Head + `nodes` workers on 127.0.0.1; returns the Cluster (its .address is the GCS address)."""
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": object_store_mib * MiB}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **common,
            "num_cpus": head_cpus,
            "include_dashboard": False,
            "_system_config": dict(HEALTH_CHECKS),
        },
    )
    for _ in range(nodes):
        cluster.add_node(**common, num_cpus=cpus)
    cluster.wait_for_nodes()
    return cluster


def kill_one_node_later(cluster, delay: float, done: threading.Event) -> threading.Thread:
    def run() -> None:
        if done.wait(delay) or not cluster.worker_nodes:
            return
        node = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
        print(f"local_cluster: removing worker node {node.node_id} without grace", file=sys.stderr, flush=True)
        cluster.remove_node(node, allow_graceful=False)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.nodes < 1 or args.cpus < 1 or args.head_cpus < 0:
        print("local_cluster: need --nodes >= 1, --cpus >= 1, --head-cpus >= 0", file=sys.stderr)
        return 2
    # Both must be in the environment before `import ray`, and the command inherits them: the driver has to
    # agree with the nodes on loopback and on auth, or it cannot join.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = args.auth
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    t0 = time.perf_counter()
    cluster = start_cluster(args.nodes, args.cpus, args.head_cpus, args.object_store_mib)
    address = cluster.address
    total = args.nodes * args.cpus + args.head_cpus
    print(
        f"local_cluster: head + {args.nodes} worker node(s) × {args.cpus} CPU ({total} CPUs) up at {address} "
        f"in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    print(address, flush=True)
    if args.address_file:
        with open(args.address_file, "w") as f:
            f.write(address + "\n")

    env = {**os.environ, "RAY_ADDRESS": address}
    done = threading.Event()
    killers: list[threading.Thread] = []
    try:
        if not command:
            print(
                "local_cluster: in another shell:\n"
                f"  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE={args.auth} RAY_ADDRESS={address}\n"
                "  chatvec merge --base ... --chat ... --cp ... --out ...\n"
                "local_cluster: Ctrl-C to stop",
                file=sys.stderr,
                flush=True,
            )
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # also when started with SIGINT ignored (`&`)
                signal.signal(sig, _interrupt)
            if args.kill_node_after is not None:
                killers.append(kill_one_node_later(cluster, args.kill_node_after, done))
            while True:
                time.sleep(3600)
        return run_command(command, env, cluster, args.kill_node_after, done, killers)
    except KeyboardInterrupt:
        return 130
    finally:
        done.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the shutdown finish
        for t in killers:  # a removal in progress finishes before the shutdown starts
            t.join()
        print("local_cluster: shutting down", file=sys.stderr, flush=True)
        cluster.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _child_setup() -> None:
    os.setpgrp()  # Ctrl-C reaches the command once, through `forward`, not twice
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # even if this script was started with SIGINT ignored


def run_command(
    command: list[str],
    env: dict,
    cluster,
    kill_node_after: float | None,
    done: threading.Event,
    killers: list[threading.Thread],
) -> int:
    """Run `command` in its own process group; Ctrl-C / SIGTERM are passed on once, a second time kills it."""
    try:
        proc = subprocess.Popen(command, env=env, preexec_fn=_child_setup)
    except OSError as e:
        print(f"local_cluster: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127
    signals = []

    def forward(signum, frame):
        signals.append(signum)
        proc.send_signal(signum if len(signals) == 1 else signal.SIGKILL)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    if kill_node_after is not None:
        killers.append(kill_one_node_later(cluster, kill_node_after, done))
    rc = proc.wait()
    done.set()  # no node removal after the command has finished
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
