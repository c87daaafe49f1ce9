"""Engines behind one interface (`generate.Stepper`): hf (reference), native (ours), deepspeed."""
from __future__ import annotations

from ..world import UsageError


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
