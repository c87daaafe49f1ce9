"""What an engine holds on this rank, for its `info` (and the traces' run metadata)."""
from __future__ import annotations


def param_bytes(model, contains: str = "") -> int:
    """Bytes this rank holds of model's parameters and buffers whose name contains `contains` (of a
    sharded tensor, its local shard: DTensor.to_local, as transformers' tensor-parallel plans make)."""
    total = 0
    for name, t in model.state_dict().items():
        if contains in name:
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total
