"""One error for every rank: a UsageError raised on one rank (or on rank 0's checks) is raised on all.

Every rank of `comm` calls these together (they are collectives over the mpi4py communicator passed in), so
no rank is left waiting in a collective for a rank that gave up.
"""
from __future__ import annotations

from typing import Any, Callable

from spmd.config import UsageError


def on_root(comm, fn: Callable[[], Any], share: bool = True) -> Any:
    """Run fn on rank 0 only; a UsageError there is raised on every rank.

    With share=True the result is broadcast; with share=False it stays on rank 0 (others get None).
    """
    result, error = None, None
    if comm.rank == 0:
        try:
            result = fn()
        except UsageError as exc:
            error = str(exc)
    error = comm.bcast(error, root=0)
    if error is not None:
        raise UsageError(error)
    return comm.bcast(result, root=0) if share else result


def agree(comm, fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if it raised UsageError on any rank, raise it on all (lowest failing rank's).

    For checks whose outcome can differ by rank (each rank reads different slices): no rank may be
    left waiting in a collective for a rank that gave up.
    """
    result, error = None, None
    try:
        result = fn()
    except UsageError as exc:
        error = str(exc)
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise UsageError(e if comm.size == 1 else f"rank {r}: {e}")
    return result
