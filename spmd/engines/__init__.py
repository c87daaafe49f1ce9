"""Engines behind one interface (the Stepper protocol of spmd.runtime.generate): hf (the reference), native
(ours), deepspeed."""
from __future__ import annotations

from spmd.config import UsageError


def build_engine(name: str, world, args, margs, timers):
    """Build the named engine on this rank (loads this rank's weights)."""
    if name == "hf":
        from spmd.engines.hf import HFEngine
        return HFEngine(world, args, margs, timers)
    if name == "native":
        from spmd.engines.native import NativeEngine
        return NativeEngine(world, args, margs, timers)
    if name == "deepspeed":
        from spmd.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(world, args, margs, timers)
    raise UsageError(f"--engine {name} is not available in this build (available: hf, native, deepspeed)")
