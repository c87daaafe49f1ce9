"""Importer of NCCL_DEBUG=INFO output: RUN_DIR/logs/rank{r:05d}*.log → the transports NCCL used.

``launch/rank.sh`` tees each rank's stdout/stderr to ``logs/rankNNNNN.log`` and points NCCL_DEBUG_FILE
at ``logs/rankNNNNN.nccl.log`` (NCCL_DEBUG=INFO). NCCL logs each channel connection as
``Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read`` (or ``via SHM/direct/direct``, ``via NET/IB/0``,
``via NET/Socket/0``, ...), the network it loaded as ``NET/IB : Using ...`` / ``Using network Socket``,
and its version as ``NCCL version 2.x.y``. P2P between GPUs of one host is NVLink where the GPUs have
it, else PCIe; these lines do not say which.

Written: root attributes ``nccl_transport`` (the transports of all ranks' channels, comma-separated;
"" if no NCCL log), ``nccl_network``, ``nccl_version``; group ``nccl/<r>`` with attributes
``transports`` and ``channels`` (JSON counts by transport / by full ``via`` string) and ``network``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import h5py

_VIA = re.compile(r"\bvia ((?:P2P|SHM|NET|COLLNET|CollNet|NVLS)(?:/[\w.-]+(?: pointer)?)*)")
_NET = re.compile(r"\b(?:NET/(\w+) : Using|Using network (\w+))")
_VERSION = re.compile(r"NCCL version (\S+)")
_RANK_LOG = re.compile(r"rank(\d+)(\..*)?\.log")


def transport_of(via: str) -> str:
    """``P2P/CUMEM/read`` → P2P, ``NET/IB/0/GDRDMA`` → NET/IB, ``SHM/direct/direct`` → SHM."""
    parts = via.split("/")
    return "/".join(parts[:2]) if parts[0] == "NET" and len(parts) > 1 else parts[0]


def parse_nccl_log(text: str) -> dict:
    """Transports (counts), channel strings (counts), networks and version seen in one log."""
    channels, nets, version = Counter(), set(), ""
    for line in text.splitlines():
        if "NCCL" not in line and "via " not in line:
            continue
        m = _VIA.search(line)
        if m and "Channel" in line:
            channels[m.group(1).strip()] += 1
        n = _NET.search(line)
        if n:
            nets.add(n.group(1) or n.group(2))
        v = _VERSION.search(line)
        if v and not version:
            version = v.group(1)
    transports = Counter()
    for via, count in channels.items():
        transports[transport_of(via)] += count
    return {"transports": dict(transports), "channels": dict(channels), "networks": sorted(nets),
            "version": version}


def rank_logs(run_dir: Path) -> dict[int, list[Path]]:
    """Rank → its log files under RUN_DIR/logs."""
    found: dict[int, list[Path]] = {}
    logs = Path(run_dir) / "logs"
    if logs.is_dir():
        for path in sorted(logs.iterdir()):
            m = _RANK_LOG.fullmatch(path.name)
            if m:
                found.setdefault(int(m.group(1)), []).append(path)
    return dict(sorted(found.items()))


def import_nccl_logs(run_dir: Path, out: h5py.File) -> None:
    """logs/rank*.log → nccl_* root attributes and nccl/<r> groups."""
    all_t, all_n, version = set(), set(), ""
    for r, paths in rank_logs(run_dir).items():
        info = parse_nccl_log("\n".join(p.read_text(errors="replace") for p in paths))
        if not (info["channels"] or info["networks"] or info["version"]):
            continue
        grp = out.require_group(f"nccl/{r}")
        grp.attrs["transports"] = json.dumps(info["transports"], sort_keys=True)
        grp.attrs["channels"] = json.dumps(info["channels"], sort_keys=True)
        grp.attrs["network"] = ",".join(info["networks"])
        all_t |= set(info["transports"])
        all_n |= set(info["networks"])
        version = version or info["version"]
    out.attrs["nccl_transport"] = ",".join(sorted(all_t))
    out.attrs["nccl_network"] = ",".join(sorted(all_n))
    out.attrs["nccl_version"] = version
