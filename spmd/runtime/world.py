"""Ranks, model groups and the torch.distributed bootstrap, from MPI.

World = n_replicas × group_size ranks. Ranks g*G .. g*G+G-1 form model group g (one copy of the
model, sharded over those ranks); the G ranks with the same group_rank across replicas are never
needed together, so only the model groups and the replica leaders get communicators.

With a dedicated orchestrator (``first=1``) world rank 0 holds no model, no device and no
torch.distributed rank: the model ranks are world ranks 1..N, torch.distributed rank = world rank - 1,
and model group g is world ranks 1+g*G .. g*G+G. Only world ranks count in traces and MPI messages.

Nothing else in the project reads RANK/LOCAL_RANK/SLURM_*: they are read (or exported) here once
and travel in the frozen `World`.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI

from spmd.config import UsageError, env
from spmd.parallel.errors import agree, on_root
from spmd.runtime import netif


@dataclass(frozen=True)
class World:
    """Frozen topology of one run, passed to every constructor that needs it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    hostname: str
    group_size: int              # G: ranks per model group
    replica: int                 # which model group this rank belongs to
    group_rank: int              # rank inside the model group
    comm: Any                    # MPI.COMM_WORLD
    group_comm: Any              # MPI communicator of this model group
    leaders_comm: Any            # MPI communicator of group leaders (MPI.COMM_NULL on other ranks)
    tp_group: Any                # torch.distributed group of this rank's tensor-parallel ranks (None: 1 rank)
    backend: str                 # "gloo" | "nccl"
    device: str                  # "cpu" | "cuda:N"
    pp: int = 1                  # P: pipeline stages per model group (group_size = P x tp_size)
    model_group: Any = None      # torch.distributed group of the whole model group (pipelines only)
    first: int = 0               # world rank of the first model rank: 1 with a dedicated orchestrator
    model_comm: Any = None       # MPI communicator of the model ranks (COMM_NULL on the orchestrator)
    ep_size: int = 1             # --group-layout dpa: ranks of this rank's expert-parallel group (else 1)
    ep_group: Any = None         # its torch.distributed group (None: 1 rank)
    ep_comm: Any = None          # its MPI communicator: the ranks step together (spmd.runtime.scheduler)

    @property
    def is_orchestrator(self) -> bool:
        """World rank 0 of a run with a dedicated orchestrator: no model, no device."""
        return self.rank < self.first

    @property
    def model_rank(self) -> int:
        """This rank's torch.distributed rank (world rank minus the orchestrator)."""
        return self.rank - self.first

    def leader(self, replica: int) -> int:
        """World rank of a model group's leader."""
        return self.first + replica * self.group_size

    @property
    def tp_size(self) -> int:
        """G: ranks of one pipeline stage (the tensor/expert-parallel group)."""
        return self.group_size // self.pp

    @property
    def tp_rank(self) -> int:
        return self.group_rank % self.tp_size

    @property
    def stage(self) -> int:
        return self.group_rank // self.tp_size

    @property
    def n_replicas(self) -> int:
        return (self.size - self.first) // self.group_size

    @property
    def is_leader(self) -> bool:
        return self.group_rank == 0


def exit_on_usage_error(comm, exc: UsageError, code: int = 2) -> None:
    """Every rank got the same error: rank 0 prints it once, all finalize and exit with `code`."""
    if comm.rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    finalize_and_exit(comm, code)


def finalize_and_exit(comm, code: int) -> None:
    """Every rank, together: leave MPI and exit with `code` at once. Finalized first, so mpi4py does not turn
    the exit into MPI_Abort; then os._exit, not the interpreter's teardown (torch's, CUDA's: up to seconds):
    under `srun --kill-on-bad-exit` the first rank to exit non-zero gets the others killed, and a rank still
    tearing down would end with SIGTERM and the job with 143 instead of `code`."""
    comm.Barrier()
    MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _local_topology(comm) -> tuple[int, int]:
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        return node.rank, node.size
    finally:
        node.Free()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def export_dist_env(comm, local_rank: int, local_size: int, backend: str = "gloo") -> tuple[str, int]:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE/MASTER_ADDR/MASTER_PORT before any torch/DeepSpeed init.

    MASTER_ADDR: the user's or batch script's, else rank 0's ``netif.rendezvous_address``. A job over
    several hosts is then checked on every rank before anything waits on the network (``check_network``).
    """
    addr = port = error = None
    if comm.rank == 0:  # a MASTER_ADDR set by the user or the batch script wins
        try:
            addr = os.environ.get("MASTER_ADDR") or netif.rendezvous_address(backend)
        except ValueError as exc:
            error = str(exc)
        port = _free_port()
    addr, port, error = comm.bcast((addr, port, error), root=0)
    if error is not None:
        raise UsageError(error)
    hosts = comm.allgather(socket.gethostname())
    agree(comm, lambda: check_network(comm, backend, addr, len(set(hosts)) > 1))
    os.environ.update(RANK=str(comm.rank), WORLD_SIZE=str(comm.size), LOCAL_RANK=str(local_rank),
                      LOCAL_SIZE=str(local_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
    return addr, port


PROBE_TIMEOUT_S = 10.0


def check_network(comm, backend: str, addr: str, multi_host: bool) -> None:
    """Every rank (agree): the backend's interface setting selects an interface here; over several hosts,
    neither the rendezvous address nor gloo's interface is loopback, gloo binds the interface that routes
    to rank 0 when not told one, and a TCP connection reaches rank 0's address and the next rank's gloo
    address within PROBE_TIMEOUT_S. Every rank takes part in the probe, failed or not (no one waits)."""
    host = socket.gethostname()
    problem, gloo_addr = None, None  # gloo_addr: the address of the interface gloo binds here
    ifaces = netif.interfaces()  # read once
    try:
        addr = socket.gethostbyname(addr)  # MASTER_ADDR may be a name
        chosen = netif.check_setting(backend, ifaces=ifaces)
        if multi_host and netif.is_loopback(addr):
            raise ValueError(f"rank 0's rendezvous address is {addr} (loopback) but the job spans hosts: "
                             "set MASTER_ADDR to an address of rank 0's host, or SPMD_IFNAME to its interface")
        if backend == "gloo" and multi_host:
            if not chosen:
                name, _ = netif.route_to(addr, ifaces)
                if name:
                    os.environ["GLOO_SOCKET_IFNAME"] = name  # not the host name's address: it may not resolve
                    chosen = [name]
            elif all(netif.is_loopback(ifaces[n]) for n in chosen):
                raise ValueError(f"GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']} on host {host} is "
                                 "loopback only: ranks on other hosts cannot reach it")
            gloo_addr = ifaces[chosen[0]] if chosen else None
    except (ValueError, OSError) as exc:
        problem = str(exc)
    if multi_host:
        problem = _probe(comm, addr, gloo_addr, problem)
    if problem:
        raise UsageError(problem)


def _probe(comm, addr: str, mine: str | None, problem: str | None) -> str | None:
    """TCP connections, each within PROBE_TIMEOUT_S: every rank to rank 0's `addr`, and (gloo) to the
    next rank's interface address `mine`. Returns this rank's problem (the one it had, or a failed one)."""
    listeners = []

    def listen(a: str, hint: str) -> tuple[str, int] | None:
        nonlocal problem
        try:
            s = socket.socket()
            listeners.append(s)
            s.bind((a, 0))
            s.listen(comm.size)
            return a, s.getsockname()[1]
        except OSError as exc:
            problem = problem or f"host {socket.gethostname()} cannot listen on {a}: {exc.strerror or exc} ({hint})"
            return None

    try:
        root = listen(addr, "MASTER_ADDR must be an address of rank 0's host") \
            if comm.rank == 0 and problem is None else None
        root = comm.bcast(root, root=0)
        ring = comm.allgather(listen(mine, "GLOO_SOCKET_IFNAME's address") if mine else None)
        nxt = ring[(comm.rank + 1) % comm.size]
        for what, target in (("rank 0's rendezvous address", root), ("the next rank's gloo address", nxt)):
            if problem is None and target is not None:
                try:
                    socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
                except OSError as exc:
                    problem = (f"host {socket.gethostname()} cannot reach {what} {target[0]}:{target[1]} "
                               f"({exc.strerror or exc}, {PROBE_TIMEOUT_S:g} s): set MASTER_ADDR, or SPMD_IFNAME "
                               f"(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) to an interface the hosts share; "
                               f"this host has: {netif.describe(netif.interfaces())}")
        comm.Barrier()  # no listener closes before every rank has tried
        return problem
    finally:
        for s in listeners:
            s.close()


def check_world_size(size: int, group_size: int, first: int = 0) -> None:
    """The world must be a whole number of model groups (after the dedicated orchestrator, if `first`)."""
    if group_size < 1:
        raise UsageError(f"--group-size={group_size} must be >= 1")
    if size - first < 1:
        raise UsageError(f"--orchestrator dedicated needs model ranks besides rank 0: the world has {size} rank")
    if (size - first) % group_size:
        if first:
            raise UsageError(f"--group-size={group_size} does not divide the {size - first} model ranks (world size "
                             f"{size} - 1 orchestrator; world = 1 + n_replicas x group_size)")
        raise UsageError(f"--group-size={group_size} does not divide the world size {size} "
                         f"(world = n_replicas x group_size)")


def check_gpus_per_node(local_size: int, device: str, n_gpus: int) -> None:
    """One GPU per model rank of a node (local_size: the node's model ranks). The world's size is checked
    once, by make_world (check_world_size)."""
    if device == "cuda" and local_size > n_gpus:
        raise UsageError(f"{local_size} ranks on this node but only {n_gpus} CUDA devices visible")


COLLECTIVE_TIMEOUT_ENV = "SPMD_COLLECTIVE_TIMEOUT_S"
# 10 minutes: a collective may legitimately wait that long for a peer that is still reading its part of
# a 690 GB checkpoint (or compiling kernels); a hung peer then fails the others' collective within it
COLLECTIVE_TIMEOUT_DEFAULT_S = 600.0


def collective_timeout(environ=os.environ) -> float:
    """Seconds a torch.distributed collective (gloo, NCCL) may wait: ``SPMD_COLLECTIVE_TIMEOUT_S`` (> 0)."""
    text = env.read(COLLECTIVE_TIMEOUT_ENV, environ)
    if not text:
        return COLLECTIVE_TIMEOUT_DEFAULT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise UsageError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r} must be a number of seconds > 0")
    return value


def make_world(group_size: int, device: str = "cpu", comm=None, pp: int = 1, first: int = 0, ep: int = 1) -> World:
    """Discover ranks over MPI, bind a GPU, init torch.distributed and the model-group communicators.

    group_size: G, the tensor/expert-parallel ranks of one stage; pp: P stages, so a model group is P x G
    ranks (``World.group_size``), a stage G consecutive ranks of it (spmd.parallel.pipeline). first=1: world rank 0
    is a dedicated orchestrator (no device, no torch.distributed); collective over `comm` all the same.

    ep > 1 (--group-layout dpa, group_size 1): every model rank serves its own requests (a group of one for
    dispatch and attention) and ep consecutive model ranks form an expert-parallel group (``ep_group``,
    ``ep_comm``) for the routed experts' all-to-alls.

    Every torch.distributed group gets rank 0's ``collective_timeout()``: past it a gloo collective raises
    (the exception aborts the job), an NCCL one ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=1).
    """
    comm = comm or MPI.COMM_WORLD
    on_root(comm, lambda: check_world_size(comm.size, group_size * pp * ep, first))
    timeout = datetime.timedelta(seconds=on_root(comm, collective_timeout))  # the same on every rank
    model = comm.Split(color=0 if comm.rank >= first else MPI.UNDEFINED, key=comm.rank)
    hosts = comm.allgather(socket.gethostname())
    replica, group_rank = divmod(comm.rank - first, group_size * pp) if comm.rank >= first else (-1, -1)
    group_comm = comm.Split(color=replica if replica >= 0 else MPI.UNDEFINED, key=comm.rank)
    leaders_comm = comm.Split(color=0 if group_rank == 0 else MPI.UNDEFINED, key=comm.rank)
    w = dict(rank=comm.rank, size=comm.size, hostname=socket.gethostname(), group_size=group_size * pp,
             replica=replica, group_rank=group_rank, comm=comm, group_comm=group_comm, leaders_comm=leaders_comm,
             pp=pp, first=first, model_comm=model)
    if model == MPI.COMM_NULL:  # the orchestrator
        return World(local_rank=0, local_size=1, tp_group=None, backend="none", device="cpu", **w)
    from spmd.parallel.pipeline import check_placement
    on_root(model, lambda: check_placement(hosts[first:], pp, group_size))
    ranks = _model_ranks(model, group_size, pp, device, timeout)
    if ep > 1:
        ranks.update(ep_size=ep, ep_comm=model.Split(color=model.rank // ep, key=model.rank),
                     ep_group=_consecutive_groups(model.size, ep, model.rank, timeout))
    return World(**w, **ranks)


def _consecutive_groups(size: int, n: int, rank: int, timeout):
    """torch.distributed groups of n consecutive ranks (every rank creates every group, in the same order);
    this rank's."""
    import torch.distributed as dist

    mine = None
    for first in range(0, size, n):
        pg = dist.new_group(list(range(first, first + n)), timeout=timeout)
        if first <= rank < first + n:
            mine = pg
    return mine


def _model_ranks(comm, tp: int, pp: int, device: str, timeout) -> dict:
    """The model ranks' part of the World (collective over their communicator): local rank and GPU,
    torch.distributed (rank = rank in `comm`), the stage groups and (pipelines) the model groups."""
    import torch
    import torch.distributed as dist

    local_rank, local_size = _local_topology(comm)
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    group_size = tp * pp
    on_root(comm, lambda: check_gpus_per_node(local_size, device, n_gpus))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dev = f"cuda:{local_rank}" if device == "cuda" else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    addr, port = export_dist_env(comm, local_rank, local_size, backend)
    if not dist.is_initialized():
        kw = {"device_id": torch.device(dev)} if device == "cuda" else {}
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=comm.rank,
                                world_size=comm.size, timeout=timeout, **kw)
    tp_group = model_group = None
    for first in range(0, comm.size, tp):  # every rank creates every group, in the same order
        pg = dist.new_group(list(range(first, first + tp)), timeout=timeout) if tp > 1 else None  # not inherited
        if first <= comm.rank < first + tp:
            tp_group = pg
    for g in range(comm.size // group_size if pp > 1 else 0):
        pg = dist.new_group(list(range(g * group_size, (g + 1) * group_size)), timeout=timeout)
        if g == comm.rank // group_size:
            model_group = pg
    return dict(local_rank=local_rank, local_size=local_size, tp_group=tp_group, model_group=model_group,
                backend=backend, device=dev)


def shutdown(world: World) -> None:
    """Free the communicators and tear torch.distributed down cleanly."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for c in (world.group_comm, world.leaders_comm, world.model_comm, world.ep_comm):
        if c is not None and c != MPI.COMM_NULL:
            c.Free()


def topology(world: World) -> dict:
    """The topology as plain data, for trace metadata and outputs."""
    return {"world_size": world.size, "role": "orchestrator" if world.is_orchestrator else "model",
            "orchestrator": "dedicated" if world.first else "inline", "group_size": world.group_size, "n_replicas": world.n_replicas,
            "pp": world.pp, "tp_size": world.tp_size, "stage": world.stage,
            "group_layout": "dpa" if world.ep_size > 1 else "tp", "ep_size": world.ep_size,
            "rank": world.rank, "replica": world.replica, "group_rank": world.group_rank,
            "local_rank": world.local_rank, "local_size": world.local_size,
            "hostname": world.hostname, "backend": world.backend, "device": world.device,
            "slurm": slurm_ids()}


SLURM_IDS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
             "SLURM_CLUSTER_NAME", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def slurm_ids() -> dict:
    """The job's SLURM ids (job, step, array, name, cluster, nodes) that are set; {} outside SLURM."""
    return {k: os.environ[k] for k in SLURM_IDS if k in os.environ}
