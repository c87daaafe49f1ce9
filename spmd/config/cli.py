"""RunArgs: the command line, with every check that needs no model (ModelArgs: spmd.config.model_args).

Checks raise `UsageError` with the numbers in the message; rank 0 runs them and the message
reaches every rank (see `world.on_root`).
"""
from __future__ import annotations

import argparse
import math
import os
import stat
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from spmd.config.errors import UsageError

PROFILE_KINDS = ("none", "torch", "nsys")  # --profile: spmd.obs.profile opens the window

ENGINES = ("hf", "native", "deepspeed")

SEED_MAX = 2 ** 64 - 1  # what torch.Generator.manual_seed takes (and negative ones, which --seed refuses)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default; not of required options and flags, where it says nothing."""

    def _get_help_string(self, action):
        if action.required or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):  # argparse would print and exit on every rank; report once instead
        raise UsageError(message)


@dataclass(frozen=True)
class RunArgs:
    checkpoint: Path
    prompts: Path
    output: Path
    trace_dir: Path | None
    engine: str
    group_size: int
    max_new_tokens: int
    dtype: str
    device: str
    dispatch: str
    dispatch_size: int
    batch_size: int
    temperature: float
    top_p: float
    seed: int
    chat: bool
    local_debug: bool
    progress: bool
    profile: str = "none"
    profile_steps: tuple[int, int] = (2, 5)
    score: Path | None = None
    score_only: bool = False
    cuda_graph: str = "auto"
    fp8_weights: str = "auto"
    fp8_unpack: str = "auto"
    fp8_prefill: str = "auto"
    resume: bool = False
    pp: int = 1
    micro_batches: int = 0
    orchestrator: str = "inline"
    batching: str = "auto"
    slots: int = 0
    prefill_tokens: int = 0
    gpu_memory_fraction: float = 0.9
    max_context: int = 0
    mla_decode: str = "auto"
    group_layout: str = "tp"


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mpi4py -m spmd", description="SPMD DeepSeek-V3 inference over MPI ranks.")
    p.add_argument("--checkpoint", type=_path, required=True, help="HF-layout checkpoint directory")
    p.add_argument("--prompts", type=_path, required=True, help=".txt (one per line) or .jsonl {id, prompt}")
    p.add_argument("--output", type=_path, required=True, help="output JSONL (written atomically by rank 0)")
    p.add_argument("--trace-dir", type=_path, default=None,
                   help="per-rank HDF5 traces + merged.h5 (None: timers off, no traces)")
    p.add_argument("--engine", choices=ENGINES, default="native", help="native, hf (transformers) or deepspeed")
    p.add_argument("--group-size", type=int, default=1, help="tensor/expert-parallel ranks per model group "
                   "(per pipeline stage with --pp)")
    p.add_argument("--group-layout", choices=("tp", "dpa"), default="tp",
                   help="tp: attention, dense layers and vocab split over the group, routed experts combined by "
                        "all-reduce; dpa: data-parallel attention (each rank its own requests, all attention and "
                        "dense weights), routed experts split over the group and reached by all-to-all "
                        "(native engine, continuous batching; docs/engines.md)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per model group (native engine): a model "
                   "group is PP x GROUP_SIZE ranks")
    p.add_argument("--micro-batches", type=int, default=0,
                   help="micro-batches per pipeline step (0: as many as --pp); rows are split evenly")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (EOS ends a row "
                   "sooner)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="compute dtype")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu (gloo) or cuda (NCCL, one GPU per rank); None: cuda when any rank sees a GPU (an "
                        "NVIDIA driver's /dev/nvidiactl or /proc/driver/nvidia/gpus/*, or ROCm's /dev/kfd; all "
                        "hidden when CUDA_VISIBLE_DEVICES is empty or -1), else cpu; --local-debug forces cpu")
    p.add_argument("--dispatch", choices=("static", "dynamic"), default=None,
                   help="static: prompts scattered by length at the start; dynamic: chunks of --dispatch-size "
                        "handed to model groups as they finish (None: static, dynamic with a dedicated "
                        "orchestrator)")
    p.add_argument("--orchestrator", choices=("inline", "dedicated"), default="inline",
                   help="inline: world rank 0 is also a model rank; dedicated: world rank 0 holds no model (no "
                        "GPU) and only reads, tokenizes, dispatches, decodes and writes: the world is 1 + "
                        "replicas x group ranks")
    p.add_argument("--dispatch-size", type=int, default=4, help="prompts per chunk (dynamic dispatch)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch of --batching static")
    p.add_argument("--batching", choices=("auto", "continuous", "static"), default="auto",
                   help="continuous: a fixed set of decode slots, a finished row's slot refilled at the next step, "
                        "prompts prefilled in chunks of --prefill-tokens (native engine); static: batches of "
                        "--batch-size decoded until their longest row ends (auto: continuous for --engine native)")
    p.add_argument("--slots", type=int, default=0,
                   help="continuous batching: decode slots per model group (0: as many as the memory left after "
                        "the weights holds, see --gpu-memory-fraction; at most 512)")
    p.add_argument("--prefill-tokens", type=int, default=0,
                   help="continuous batching: prompt tokens per prefill forward (0: from the memory left, at most "
                        "16384); longer prompts are prefilled in chunks")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9,
                   help="continuous batching on CUDA: the share of the GPU's memory the run may use (weights, "
                        "slots' latent cache, activations)")
    p.add_argument("--mla-decode", choices=("auto", "torch", "varlen"), default="auto",
                   help="continuous batching: decode attention in torch over the step's padded columns, or "
                        "varlen: the Triton kernel over each row's own columns (spmd/kernels/mla_decode.py; "
                        "8x faster at 400 chat-length rows on an H100); auto: varlen on CUDA with Triton, "
                        "else torch")
    p.add_argument("--max-context", type=int, default=0,
                   help="continuous batching: cache length of a slot (0: the longest prompt + its max new tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p of sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed + prompt index)")
    p.add_argument("--no-chat-template", dest="chat", action="store_false", help="tokenize prompts raw")
    p.add_argument("--local-debug", action="store_true", help="CPU, gloo, no DeepSpeed/NCCL setup")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (finished prompts, output tokens/s) on rank 0")
    p.add_argument("--profile", choices=PROFILE_KINDS, default="none",
                   help="profiler window over decode steps (torch: chrome trace in TRACE_DIR/torch; nsys: "
                        "cudaProfilerStart/Stop for launch/rank.sh PROFILE=nsys)")
    p.add_argument("--score", type=_path, default=None, metavar="BASELINE",
                   help="teacher-forced scoring of a validation.baseline file's tokens (adds `score` to each row; "
                        "None: no scoring)")
    p.add_argument("--score-only", action="store_true", help="with --score: score, do not generate")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run of OUTPUT.progress/ (same prompts, checkpoint and token-"
                        "deciding options; the layout may differ); without it that directory is replaced")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off", "static"), default="auto",
                   help="native engine on CUDA: replay each decode step as one captured CUDA graph (auto: when "
                        "the MoE runs grouped GEMMs); traces then hold one event per step, not per layer. "
                        "static: the graph's static-shape step run eagerly, any device")
    p.add_argument("--fp8-weights", choices=("auto", "keep", "dequant"), default="auto",
                   help="native engine, FP8 checkpoint: keep FP8 weights on the GPU (Triton w8a16 kernels) or "
                        "dequantize them at load (auto: keep on CUDA sm_80+ when Triton is there)")
    p.add_argument("--fp8-unpack", choices=("auto", "hw", "bytes"), default="auto",
                   help="kept FP8 weights: converted by the GPU's e4m3 type (hw, sm_89+) or decoded from their "
                        "bytes in the kernel (bytes: Ampere, sm_80+); auto: hw where the GPU has it")
    p.add_argument("--fp8-prefill", choices=("auto", "w8a8", "w8a16"), default="auto",
                   help="kept FP8 weights: prefill-sized GEMMs quantize activations per row and 128 columns and "
                        "run FP8 x FP8 on tensor cores (w8a8, sm_89+), or stay weight-only (w8a16); "
                        "auto: w8a8 where the GPU has FP8 tensor cores")
    p.add_argument("--profile-steps", type=_steps, default="2:5", metavar="A:B",  # a str default goes through type
                   help="decode steps A..B inside the window")
    return p


def _path(text: str) -> Path:
    """A path argument: "" would become Path("."), the current directory, which nobody means."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file")
    return Path(text)


def _steps(text: str) -> tuple[int, int]:
    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_steps(text: str) -> tuple[int, int]:
    """``"A:B"`` → (A, B) with 1 <= A <= B; ValueError otherwise."""
    a, sep, b = text.partition(":")
    try:
        first, last = int(a), int(b if sep else a)
    except ValueError:
        raise ValueError(f"--profile-steps {text!r}: expected A:B (decode steps, e.g. 2:5)") from None
    if not 1 <= first <= last:
        raise ValueError(f"--profile-steps {text!r}: need 1 <= A <= B")
    return first, last


def gpu_visible(environ=os.environ, root: Path = Path("/")) -> bool:
    """Whether this node has a GPU for torch, found without importing torch (spmd.config must not): an NVIDIA
    driver (/dev/nvidiactl, /proc/driver/nvidia/gpus/*) or ROCm's /dev/kfd, unless CUDA_VISIBLE_DEVICES is
    "" or -1 (every device hidden). `environ` and `root` for tests."""
    if environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return ((root / "dev/nvidiactl").exists() or (root / "dev/kfd").exists()
            or any((root / "proc/driver/nvidia/gpus").glob("*")))


def parse_args(argv: list[str] | None = None, gpu: bool | None = None) -> RunArgs:
    """RunArgs of argv, checked. gpu: whether a GPU is there for the --device default (None: this node's
    `gpu_visible()`; spmd.runtime.run passes what all ranks agree on, as a dedicated orchestrator's host
    may have none)."""
    ns = parser().parse_args(argv)
    if ns.local_debug:
        ns.device = "cpu"
    elif ns.device is None:
        ns.device = "cuda" if (gpu_visible() if gpu is None else gpu) else "cpu"
    explicit_static = ns.dispatch == "static"
    ns.dispatch = ns.dispatch or ("dynamic" if ns.orchestrator == "dedicated" else "static")
    if explicit_static and ns.orchestrator == "dedicated":
        raise UsageError("--orchestrator dedicated hands out prompts as groups finish: use --dispatch dynamic "
                         "(or leave --dispatch out)")
    args = RunArgs(**{f.name: getattr(ns, f.name) for f in fields(RunArgs)})
    check_run_args(args)
    return args


def check_run_args(a: RunArgs) -> None:
    """Checks that need no file system."""
    for name in ("group_size", "max_new_tokens", "dispatch_size", "batch_size", "pp"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    for name in ("slots", "prefill_tokens", "max_context"):
        if getattr(a, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1 (0: chosen from memory)")
    if not 0 < a.gpu_memory_fraction <= 1:
        raise UsageError(f"--gpu-memory-fraction={a.gpu_memory_fraction} must be in (0, 1]")
    if a.batching == "continuous" and a.engine != "native":
        raise UsageError(f"--batching continuous runs in the native engine; --engine {a.engine} runs static batches")
    if a.group_layout == "dpa":
        check_dpa(a)
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UsageError(f"--temperature={a.temperature} must be a finite number >= 0 (0: greedy)")
    if not 0 < a.top_p <= 1:  # nan fails too
        raise UsageError(f"--top-p={a.top_p} must be in (0, 1]")
    if not 0 <= a.seed <= SEED_MAX:
        raise UsageError(f"--seed={a.seed} must be in 0..{SEED_MAX} (2^64 - 1)")
    if a.output.name in ("", ".", ".."):
        raise UsageError(f"--output {a.output} names a directory: give a file name (e.g. out.jsonl)")
    if a.local_debug and a.engine == "deepspeed":
        raise UsageError("--local-debug skips DeepSpeed setup: use --engine native or hf")
    if a.score_only and a.score is None:
        raise UsageError("--score-only needs --score BASELINE")
    if a.profile == "torch" and a.trace_dir is None:
        raise UsageError("--profile torch writes TRACE_DIR/torch/rank*.json: give --trace-dir")
    if a.cuda_graph == "on" and (a.device != "cuda" or a.engine != "native"):
        raise UsageError(f"--cuda-graph on needs --engine native --device cuda, got --engine {a.engine} "
                         f"--device {a.device}")
    if a.micro_batches < 0:
        raise UsageError(f"--micro-batches={a.micro_batches} must be >= 1 (0: as many as --pp)")
    if a.pp > 1 and a.engine != "native":
        raise UsageError(f"--pp {a.pp}: pipeline stages are built by --engine native only, got --engine {a.engine}")
    if a.pp > 1 and a.cuda_graph in ("on", "static"):
        raise UsageError(f"--pp {a.pp} runs eager steps (a stage waits on its neighbours between micro-batches): "
                         f"--cuda-graph {a.cuda_graph} is not available with pipeline stages")
    if a.profile == "nsys" and a.device != "cuda":
        raise UsageError(f"--profile nsys opens the window with cudaProfilerStart: needs --device cuda, "
                         f"got --device {a.device}")


def check_dpa(a: RunArgs) -> None:
    """--group-layout dpa: the native engine's continuous loop, one stage. Every forward of a rank meets its
    group in the MoE all-to-alls, so the ranks step together (spmd.runtime.scheduler; --score at the end,
    serve.Sink); the static loop, whose forwards differ in number between ranks, does not."""
    why = []
    if a.engine != "native":
        why.append(f"--engine native (got {a.engine})")
    if a.batching == "static" or a.score_only:
        why.append("--batching continuous or auto (not static, not --score-only)")
    if a.pp != 1:
        why.append(f"--pp 1 (got {a.pp})")
    if a.cuda_graph in ("on", "static"):
        why.append("--cuda-graph auto or off (its all-to-alls size their buffers on the host: eager decode)")
    if why:
        raise UsageError("--group-layout dpa needs " + ", ".join(why))


def check_paths(a: RunArgs) -> None:
    """Checks on the file system (rank 0 only)."""
    if not a.checkpoint.is_dir():
        raise UsageError(f"checkpoint directory {a.checkpoint} does not exist")
    for name in ("config.json", "model.safetensors.index.json"):
        if not (a.checkpoint / name).is_file():
            raise UsageError(f"checkpoint {a.checkpoint} has no {name}")
    if not a.prompts.is_file():
        raise UsageError(f"prompt file {a.prompts} does not exist")
    if a.score is not None and not a.score.is_file():
        raise UsageError(f"baseline file {a.score} (--score) does not exist")
    check_outputs(a)


def check_outputs(a: RunArgs) -> None:
    """Rank 0, before any model work: what the run writes destroys nothing. OUTPUT and OUTPUT's summary
    (`x.summary.json`) must each be a new path or a regular file that is none of the inputs (prompts,
    baseline, a checkpoint file: same st_dev/st_ino, so links count), in a writable directory;
    `OUTPUT.progress` a directory (not a symlink) or absent; --trace-dir a writable directory."""
    inputs = _input_files(a)
    _check_output_file(a.output, "--output", inputs)
    _check_output_file(a.output.with_suffix(".summary.json"), "the run summary (beside --output)", inputs)
    _check_writable_dir(a.output.parent, "output directory")
    progress = a.output.with_name(a.output.name + ".progress")  # spmd.runtime.resume.progress_dir
    if progress.is_symlink() or (progress.exists() and not progress.is_dir()):
        raise UsageError(f"progress directory {progress} (beside --output) is "
                         f"{'a symlink' if progress.is_symlink() else 'not a directory'}: it is never followed or "
                         f"replaced; remove it, or give another --output")
    t = a.trace_dir
    if t is None:
        return
    if t.suffix in (".h5", ".hdf5"):
        raise UsageError(f"--trace-dir {t} ends in {t.suffix}: it names a directory (rank*.h5 and merged.h5 go in it)")
    if t.exists() and not t.is_dir():
        raise UsageError(f"--trace-dir {t} is not a directory ({_kind(t.stat())})")
    if any(t.absolute() == p.absolute() for p in (a.output, progress)):
        raise UsageError(f"--trace-dir {t} is the output's own path: give another directory")
    _check_writable_dir(t, "trace directory")


def _check_writable_dir(d: Path, what: str) -> None:
    if d.exists() and not d.is_dir():
        raise UsageError(f"{what} {d} is not a directory")
    try:  # found now, not after an hour of generation (root passes permission checks: really write)
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise UsageError(f"{what} {d} is not writable: {exc.strerror or exc}") from None


def _input_files(a: RunArgs) -> dict[tuple[int, int], str]:
    """(st_dev, st_ino) → what it is, for every file the run reads: prompts, baseline, the checkpoint's files."""
    named = [(a.prompts, "the prompt file"), *([(a.score, "the --score baseline")] if a.score is not None else [])]
    try:
        with os.scandir(a.checkpoint) as entries:
            named += [(Path(e.path), f"a file of checkpoint {a.checkpoint}") for e in entries]
    except OSError:
        pass
    found = {}
    for path, what in named:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.setdefault((st.st_dev, st.st_ino), f"{what} {path}")
    return found


def _kind(st: os.stat_result) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(st.st_mode):
            return name
    return "not a regular file"


def _check_output_file(path: Path, what: str, inputs: dict[tuple[int, int], str]) -> None:
    """A new path (or a dangling symlink, which the atomic write replaces), or a regular file that is no input."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # new; a directory that is not one is named by _check_writable_dir
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is a directory: give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path} is {_kind(st)}, not a regular file: writing it would replace it; give "
                         f"a new file name or a regular file")
    same = inputs.get((st.st_dev, st.st_ino))
    if same is not None:
        raise UsageError(f"{what} {path} is {same} (the same file): writing it would destroy it; give another "
                         f"--output")
