"""Engines behind one interface (`generate.Stepper`): hf (reference), native (ours), deepspeed."""
from __future__ import annotations

from ..world import UsageError


def param_bytes(model, contains: str = "") -> int:
    """Bytes this rank holds of model's parameters and buffers whose name contains `contains` (of a
    sharded tensor, its local shard: DTensor.to_local, as transformers' tensor-parallel plans make)."""
    total = 0
    for name, t in model.state_dict().items():
        if contains in name:
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def build_engine(name: str, world, args, margs, timers):
    """Build the named engine on this rank (loads this rank's weights)."""
    if name == "hf":
        from .hf import HFEngine
        return HFEngine(world, args, margs, timers)
    if name == "native":
        from .native import NativeEngine
        return NativeEngine(world, args, margs, timers)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(world, args, margs, timers)
    raise UsageError(f"--engine {name} is not available in this build (available: hf, native, deepspeed)")
