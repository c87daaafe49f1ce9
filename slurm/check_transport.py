"""Policy on the network NCCL used in a finished run: ``python slurm/check_transport.py RUN_DIR [--require-ib]``.

The facts come from the merged trace: traces/nccl_log.py reads each rank's NCCL_DEBUG=INFO log (written
by launch/rank.sh into RUN_DIR/logs) into the root attributes ``nccl_transport`` and ``nccl_network`` and
per rank ``nccl/<r>`` (``channels``: JSON counts by ``via`` string). This script only judges them:

    ib       channels between hosts went over NET/IB (GPUDirect RDMA noted when a channel says GDRDMA)
    socket   a channel went over NET/Socket, or NCCL loaded only its Socket network on a multi-host run:
             TCP instead of InfiniBand, typically 10-50x less bandwidth. Loud warning; exit 3 with --require-ib
    local    NCCL used only P2P/SHM: one host, nothing crossed a network
    none     no NCCL log: a gloo (CPU) run, or NCCL_LOG=0. With --require-ib a multi-host NCCL run fails
             (exit 3) because IB cannot be shown; a gloo run passes (gloo has no IB transport to require)

The check runs after the job step, in the batch script (slurm/common.sh), not inside the SPMD program:
the NCCL log is complete only once the ranks have ended, and the same code path runs on CPU-only CI,
where there is no NCCL at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py

POLICY_EXIT = 3


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_facts(merged: Path) -> dict:
    """Transports, networks, channel strings, hosts and backend of a merged trace."""
    with h5py.File(merged, "r") as f:
        transports = {t for t in _text(f.attrs.get("nccl_transport", "")).split(",") if t}
        networks = {n for n in _text(f.attrs.get("nccl_network", "")).split(",") if n}
        channels = set()
        for grp in (f["nccl"].values() if "nccl" in f else []):
            channels |= set(json.loads(_text(grp.attrs.get("channels", "{}"))))
        hosts, backends = set(), set()
        for grp in (f["ranks"].values() if "ranks" in f else []):
            world = json.loads(_text(grp.attrs.get("world", "{}")))
            if world.get("role") == "orchestrator":  # --orchestrator dedicated: no NCCL, maybe a CPU-only host
                continue
            hosts.add(_text(grp.attrs.get("hostname", "")))
            backends.add(world.get("backend", ""))
    return {"transports": transports, "networks": networks, "channels": channels,
            "hosts": hosts - {""}, "backends": backends - {""}}


def verdict(facts: dict) -> tuple[str, str]:
    """(ib | socket | local | none, one line saying why)."""
    t, nets, n_hosts = facts["transports"], facts["networks"], len(facts["hosts"])
    if not (t or nets):
        why = "gloo over TCP" if facts["backends"] <= {"gloo"} else "NCCL_LOG=0 or NCCL never started"
        return "none", f"no NCCL transport in the trace ({why})"
    if "NET/Socket" in t or (n_hosts > 1 and nets == {"Socket"}):
        return "socket", f"NCCL used TCP sockets between hosts (transports {sorted(t)}, network {sorted(nets)})"
    if any(x.startswith("NET/IB") for x in t):
        gdr = any("GDRDMA" in c for c in facts["channels"])
        return "ib", f"NCCL used InfiniBand ({'GPUDirect RDMA' if gdr else 'no GDRDMA: staged through host memory'})"
    return "local", f"NCCL stayed inside the host (transports {sorted(t)})"


def check(run_dir: Path, require_ib: bool) -> int:
    """Print the verdict; the exit status the job should end with."""
    merged = Path(run_dir) / "merged.h5"
    if not merged.is_file():
        print(f"check_transport: {merged} not found", file=sys.stderr)
        return 1
    facts = read_facts(merged)
    kind, why = verdict(facts)
    print(f"transport: {kind}: {why}")
    if kind == "socket":
        bar = "!" * 78
        print(f"{bar}\nWARNING: NCCL FELL BACK TO SOCKETS: inter-node collectives ran over TCP, not InfiniBand.\n"
              "Check NCCL_IB_HCA / NCCL_SOCKET_IFNAME, the IB user-space libraries (libibverbs, mlx5 provider;\n"
              f"inside the container too) and RUN_DIR/logs/rank*.nccl.log.\n{bar}", file=sys.stderr)
        return POLICY_EXIT if require_ib else 0
    multi_nccl = len(facts["hosts"]) > 1 and "nccl" in facts["backends"]
    if require_ib and kind == "none" and multi_nccl:
        print("check_transport: --require-ib: a multi-host NCCL run without an NCCL log cannot show IB",
              file=sys.stderr)
        return POLICY_EXIT
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="slurm/check_transport.py", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--require-ib", action="store_true", help=f"exit {POLICY_EXIT} on a Socket fallback")
    a = p.parse_args(argv)
    return check(a.run_dir, a.require_ib)


if __name__ == "__main__":
    sys.exit(main())
