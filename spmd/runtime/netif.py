"""Network interfaces of this host: which one the rendezvous and gloo use, and checks that fail fast.

The classic multi-node failures this guards against: MASTER_ADDR resolving to loopback, an interface
setting (``GLOO_SOCKET_IFNAME`` for gloo, ``NCCL_SOCKET_IFNAME`` for NCCL's bootstrap and socket
transport; ``SPMD_IFNAME`` in launch/env.sh sets both) that names no interface of some host, or an
address other hosts cannot reach. Each of those would otherwise leave ranks waiting in
``init_process_group`` until the collective timeout; here they end the job at start-up with the host,
the setting and the interfaces it has.

- ``interfaces()``: name -> IPv4 address (None without one), from ``socket.if_nameindex`` and the
  SIOCGIFADDR ioctl (Linux).
- ``matching(setting, nccl)``: the interfaces a setting selects: for gloo a comma-separated list of exact
  names; for NCCL its own syntax (prefixes, ``=`` exact names, ``^`` to exclude).
- ``route_to(addr)``: the local interface and address the kernel routes to ``addr`` (a UDP socket's
  connect sends nothing).
- ``rendezvous_address()``: rank 0's address for the TCP store: the first address the backend's interface
  setting selects; else the host name's address when it is not loopback; else the address of the
  interface carrying the default route; else loopback (good for a one-host job only).
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

SIOCGIFADDR = 0x8915
ENV_BY_BACKEND = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}


def interfaces() -> dict[str, str | None]:
    """This host's interfaces: name -> IPv4 address, or None when it has none."""
    out: dict[str, str | None] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
            except OSError:
                out[name] = None
    return out


def matching(setting: str, nccl: bool, ifaces: dict[str, str | None]) -> list[str]:
    """Interface names (with an IPv4 address) that `setting` selects, in ifaces' order."""
    with_addr = [n for n, a in ifaces.items() if a]
    if not nccl:
        names = [x.strip() for x in setting.split(",") if x.strip()]
        return [n for n in names if n in with_addr]
    text = setting.strip()
    exclude = text.startswith("^")
    text = text.lstrip("^")
    exact = text.startswith("=")
    text = text.lstrip("=")
    pats = [x.strip() for x in text.split(",") if x.strip()]
    hit = (lambda n: n in pats) if exact else (lambda n: any(n.startswith(p) for p in pats))
    return [n for n in with_addr if hit(n) != exclude]


def describe(ifaces: dict[str, str | None]) -> str:
    return ", ".join(f"{n} {a or '(no IPv4)'}" for n, a in ifaces.items()) or "none"


def check_setting(backend: str, environ=os.environ, ifaces: dict[str, str | None] | None = None) -> list[str]:
    """The interfaces the backend's setting selects here; ValueError naming the host when it is set and
    selects none (unset: [])."""
    var = ENV_BY_BACKEND[backend]
    setting = environ.get(var, "").strip()
    if not setting:
        return []
    ifaces = interfaces() if ifaces is None else ifaces
    found = matching(setting, backend == "nccl", ifaces)
    if not found:
        raise ValueError(f"{var}={setting} selects no interface with an IPv4 address on host "
                         f"{socket.gethostname()} (it has: {describe(ifaces)})")
    return found


def is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def route_to(addr: str, ifaces: dict[str, str | None] | None = None) -> tuple[str | None, str]:
    """(interface name or None, local address) the kernel uses to reach `addr` (ifaces: `interfaces()`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))  # UDP: no packet is sent, only the route is looked up
        local = s.getsockname()[0]
    names = [n for n, a in (interfaces() if ifaces is None else ifaces).items() if a == local]
    return (names[0] if names else None), local


def _default_route_address() -> str | None:
    """The address of the interface holding the default route (from /proc/net/route), if any."""
    try:
        lines = open("/proc/net/route").read().splitlines()[1:]
    except OSError:
        return None
    ifaces = interfaces()
    for line in lines:
        f = line.split()
        if len(f) > 2 and f[1] == "00000000" and ifaces.get(f[0]):
            return ifaces[f[0]]
    return None


def rendezvous_address(backend: str, environ=os.environ) -> str:
    """Rank 0's address for the rendezvous (module docstring); ValueError if the setting selects nothing."""
    chosen = check_setting(backend, environ)
    if chosen:
        return interfaces()[chosen[0]]
    try:
        addr = socket.gethostbyname(socket.getfqdn())
        if not is_loopback(addr):
            return addr
    except OSError:
        pass
    return _default_route_address() or "127.0.0.1"
