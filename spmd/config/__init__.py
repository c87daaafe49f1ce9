"""What a run is asked to do: the command line (RunArgs), the checkpoint's config (ModelArgs), every SPMD_*
environment variable (spmd.config.env) and UsageError. Imports neither torch nor mpi4py (a test checks)."""
from spmd.config.cli import PROFILE_KINDS, RunArgs, check_paths, check_run_args, parse_args, parse_steps, parser
from spmd.config.errors import FP8_BLOCK, UsageError
from spmd.config.model_args import ModelArgs, check_model_topology

__all__ = ["FP8_BLOCK", "PROFILE_KINDS", "ModelArgs", "RunArgs", "UsageError", "check_model_topology",
           "check_paths", "check_run_args", "parse_args", "parse_steps", "parser"]
