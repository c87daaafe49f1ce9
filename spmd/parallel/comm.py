"""Process groups and their named, timed collectives; timers attached to what is built, not passed in.

``Group`` wraps one torch.distributed group. Its collectives are called by name at their call site
(``self.tp.all_reduce("moe.combine", y, self.layer)``) and timed there as one comm event of the timers
attached to the Group: bytes = this rank's buffer, group = the Group's trace name ("tp": the model
group's tensor and expert parallel ranks; "ep": the expert-parallel ranks of a data-parallel-attention
group (spmd.parallel.ep); "pp": a pipeline's stages). ``Group()`` (no torch group) is one
device: each collective returns its input and records nothing, so a layer given it is the single-device
layer (DESIGN.md, house rule 3). Layers take their rank and size from the Group.

Timers are attached after construction, the way ``spmd.model.transformer.use_fused`` switches fused ops:
a class that times something declares ``timers = UNTIMED`` (every span the one shared null context, so
an unattached model costs a method call per span and records nothing), and ``attach_timers(root,
timers)`` sets the run's ``spmd.obs.timers.Timers`` on every module under root whose class declares it
and on every Group or other declaring object those modules hold. Layers never take a timers argument
(house rule 2); the spans they open keep their names, layers and leaf structure (spmd.obs.timers).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

NULL_SPAN = nullcontext()  # stateless: entered and left any number of times


class Untimed:
    """The recorder of whatever no timers were attached to: every span is NULL_SPAN."""

    __slots__ = ()
    enabled = False

    def compute(self, name: str, layer: int = -1):
        return NULL_SPAN

    def comm(self, name: str, nbytes: int, group: str = "", layer: int = -1):
        return NULL_SPAN


UNTIMED = Untimed()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class Group:
    """One process group's collectives, each named by its caller and timed by the attached timers."""

    timers = UNTIMED  # set by attach_timers

    def __init__(self, group=None, name: str = "tp"):
        self.group, self.name = group, name
        self.rank, self.size = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        self.sent: dict[str, list[int]] = {}  # all_to_all name -> bytes sent to each group rank, whole run

    def __repr__(self) -> str:
        return f"Group({self.name!r}, rank={self.rank}, size={self.size})"

    def all_reduce(self, name: str, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Sum x in place over the group; comm event `name`."""
        if self.group is None:
            return x
        with self.timers.comm(name, _nbytes(x), group=self.name, layer=layer):
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, name: str, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """The ranks' x concatenated along the last dim, in rank order; comm event `name`, this rank's bytes."""
        if self.group is None:
            return x
        x = x.contiguous()
        with self.timers.comm(name, _nbytes(x), group=self.name, layer=layer):
            if x.is_cuda:  # one output buffer (no list of tensors): what a CUDA graph captures best
                out = x.new_empty((self.size, *x.shape))
                dist.all_gather_into_tensor(out, x, group=self.group)
            else:
                out = [torch.empty_like(x) for _ in range(self.size)]
                dist.all_gather(out, x, group=self.group)
        return torch.cat(list(out), dim=-1)

    def all_to_all(self, name: str, out: torch.Tensor, x: torch.Tensor, out_splits: list[int],
                   in_splits: list[int], layer: int = -1) -> torch.Tensor:
        """Rows x[sum(in_splits[:d]):...] to rank d, rows from rank s into out at sum(out_splits[:s]); comm
        event `name`, the bytes this rank sends (spmd.parallel.ep: dispatch and combine); the bytes sent to
        each rank are added up in ``sent[name]`` (the trace's ``ep_traffic``)."""
        if self.group is None:
            return out.copy_(x)
        row = _nbytes(x[:1]) if len(x) else 0
        tally = self.sent.setdefault(name, [0] * self.size)
        for d, n in enumerate(in_splits):  # per destination (host ints: no device sync)
            tally[d] += n * row
        with self.timers.comm(name, _nbytes(x), group=self.name, layer=layer):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def broadcast(self, name: str, x: torch.Tensor, src: int) -> torch.Tensor:
        """x of torch.distributed rank `src` into x on every rank of the group; comm event `name`."""
        if self.group is None:
            return x
        with self.timers.comm(name, _nbytes(x), group=self.name):
            dist.broadcast(x, src, group=self.group)
        return x

    def recv(self, name: str, x: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        """Receive x from torch.distributed rank `src` (blocking); comm event `name`."""
        with self.timers.comm(name, _nbytes(x), group=self.name):
            dist.recv(x, src, group=self.group, tag=tag)
        return x

    def isend(self, name: str, x: torch.Tensor, dst: int, tag: int = 0):
        """Start sending x to torch.distributed rank `dst`; returns the Work to wait on. The comm event
        `name` times the call only (the transfer overlaps what follows)."""
        with self.timers.comm(name, _nbytes(x), group=self.name):
            return dist.isend(x, dst, group=self.group, tag=tag)


def _declares_timers(obj) -> bool:
    return isinstance(getattr(type(obj), "timers", None), Untimed)


def attach_timers(root, timers=None) -> None:
    """Time what runs under root with `timers` (None: UNTIMED again). root: a module (walked with all its
    submodules) or another object (a Pipeline); each one whose class declares ``timers = UNTIMED``, and each
    such object one of them holds as an attribute (its Group), gets `timers`."""
    timers = UNTIMED if timers is None else timers
    parts = root.modules() if isinstance(root, nn.Module) else (root,)
    for part in parts:
        for obj in (part, *vars(part).values()):
            if _declares_timers(obj):
                obj.timers = timers
