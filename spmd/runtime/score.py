"""`--score BASELINE`: read and check a baseline (rank 0), hand its tokens to the model groups, attach the scores.

A baseline file (written by `validation.baseline`) is JSONL: a header line `{"kind": "spmd-baseline", ...}`
with the fingerprints of the checkpoint and of the prompt set, then one row per prompt with the prompt's
token ids, the greedy completion's ids and, per generated position, the top-k ids and log-probs.
A file without that header is a text baseline (`{id, completion}` rows): compared as text, never scored.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from spmd.config import UsageError
from spmd.parallel.errors import on_root
from spmd.runtime.records import Result, Sampling, WorkItem

KIND = "spmd-baseline"
FORMAT = 1


class BaselineError(ValueError):
    """A bad baseline file, or one that does not belong to this checkpoint and prompt set."""


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """sha256 of config.json followed by model.safetensors.index.json (the bytes as stored). What a baseline
    records; a progress directory also records weights_fingerprint and tokenizer_fingerprint."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        try:
            h.update((Path(checkpoint) / name).read_bytes())
        except OSError as exc:
            raise BaselineError(f"cannot fingerprint checkpoint {checkpoint}: {exc}") from None
    return h.hexdigest()


SAMPLE_CHUNKS = 8  # weights_fingerprint: chunks read per shard, spread over its tensor data
SAMPLE_BYTES = 16 * 1024  # each chunk's size
MAX_HEADER = 100_000_000  # a larger safetensors header is not one (the safetensors library refuses it too)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.json", "chat_template.jinja")


def weights_fingerprint(checkpoint: Path) -> str:
    """sha256 over the weights, read cheaply: for every shard the index names (sorted), its name, size and
    safetensors header (every tensor's name, dtype, shape and offsets), and SAMPLE_CHUNKS chunks of
    SAMPLE_BYTES at fixed, evenly spread offsets of its tensor data, first and last byte included (a shard
    with less data: all of it). 128 KiB plus the header per shard: about 30 MB of DeepSeek-V3's 690 GB.

    Enough to tell checkpoints apart: another checkpoint of the same shapes (another release or fine-tune,
    other random weights) differs in essentially every tensor, so in the sampled bytes with overwhelming
    probability. Not caught: an edit confined to bytes no chunk covers (a few tensors changed, a flipped byte).
    """
    ckpt = Path(checkpoint)
    try:
        index = json.loads((ckpt / "model.safetensors.index.json").read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BaselineError(f"cannot fingerprint checkpoint {checkpoint}: bad index ({exc})") from None
    h = hashlib.sha256()
    for name in shards:
        try:
            with open(ckpt / str(name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 <= n <= min(MAX_HEADER, size - 8):
                    raise BaselineError(f"cannot fingerprint checkpoint {checkpoint}: {name} is not a safetensors "
                                        f"file (header of {n} bytes in a file of {size})")
                h.update(f"{name}\0{size}\0".encode() + head + f.read(n))
                start, length = 8 + n, size - 8 - n
                if length <= SAMPLE_CHUNKS * SAMPLE_BYTES:
                    spots = [(start, length)]
                else:
                    step = (length - SAMPLE_BYTES) // (SAMPLE_CHUNKS - 1)
                    spots = [(start + k * step if k < SAMPLE_CHUNKS - 1 else size - SAMPLE_BYTES, SAMPLE_BYTES)
                             for k in range(SAMPLE_CHUNKS)]
                for offset, count in spots:
                    f.seek(offset)
                    h.update(f.read(count))
        except OSError as exc:
            raise BaselineError(f"cannot fingerprint checkpoint {checkpoint}: {exc}") from None
    return h.hexdigest()


def tokenizer_fingerprint(checkpoint: Path) -> str:
    """sha256 over the sha256 of each tokenizer file there (TOKENIZER_FILES, then any
    additional_chat_templates/*.jinja), with the names of those absent."""
    ckpt = Path(checkpoint)
    extra = ckpt / "additional_chat_templates"
    names = list(TOKENIZER_FILES) + (sorted(f"{extra.name}/{p.name}" for p in extra.glob("*.jinja"))
                                     if extra.is_dir() else [])
    h = hashlib.sha256()
    for name in names:
        try:
            digest = file_sha256(ckpt / name) if (ckpt / name).is_file() else "absent"
        except OSError as exc:
            raise BaselineError(f"cannot fingerprint the tokenizer of {checkpoint}: {exc}") from None
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def prompts_fingerprint(pairs: list[tuple[str, str]]) -> str:
    """sha256 of the ordered (id, prompt text) pairs as canonical JSON."""
    return hashlib.sha256(json.dumps([list(p) for p in pairs], ensure_ascii=False).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes: ties a run's scores to the baseline file they were computed against."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_baseline(path: Path) -> tuple[dict | None, list[dict]]:
    """(header, rows) of a token baseline, or (None, rows) for a text baseline; bad files → BaselineError."""
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"cannot read baseline {path}: {exc}") from None
    try:
        objs = [json.loads(ln) for ln in lines]
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline {path}: invalid JSON ({exc.msg})") from None
    if not objs or not all(isinstance(o, dict) for o in objs):
        raise BaselineError(f"baseline {path}: expected JSON objects, one per line")
    header = objs[0] if objs[0].get("kind") == KIND else None
    rows = objs[1:] if header else objs
    if header is not None and header.get("format") != FORMAT:
        raise BaselineError(f"baseline {path}: format {header.get('format')}, this program reads format {FORMAT}")
    need = ("id", "prompt", "completion", "prompt_token_ids", "completion_token_ids", "token_logprobs",
            "topk_ids", "topk_logprobs") if header else ("id", "completion")
    for n, row in enumerate(rows, 2 if header else 1):
        missing = [k for k in need if k not in row]
        if missing:
            raise BaselineError(f"{path}:{n}: baseline row lacks {', '.join(missing)}")
    if header is not None and len(rows) != header.get("n_prompts"):
        raise BaselineError(f"baseline {path}: header says {header.get('n_prompts')} prompts, file has {len(rows)}")
    return header, rows


def check_prompt_set(ours: list[tuple[str, str]], theirs: list[tuple[str, str]], what: str) -> None:
    """The same ids with the same texts in the same order, else a BaselineError naming the first difference."""
    if len(ours) != len(theirs):
        raise BaselineError(f"{what}: {len(ours)} prompts here, {len(theirs)} in the baseline")
    for i, ((a_id, a_text), (b_id, b_text)) in enumerate(zip(ours, theirs)):
        if a_id != b_id:
            moved = " (same ids, other order)" if {p[0] for p in ours} == {p[0] for p in theirs} else ""
            raise BaselineError(f"{what}: prompt {i} is {a_id!r} here but {b_id!r} in the baseline{moved}")
        if a_text != b_text:
            raise BaselineError(f"{what}: prompt {a_id!r} has a different text than in the baseline")


def load_targets(path: Path, checkpoint: Path, prompts, ids: list[list[int]]) -> tuple[int, list[tuple]]:
    """Rank 0: check the baseline against this run; (top_k, [(baseline ids, top-k ids per position)] per prompt)."""
    header, rows = read_baseline(path)
    if header is None:
        raise BaselineError(f"baseline {path} is a text baseline (no token ids): --score needs a baseline made by "
                         f"python -m validation.baseline")
    fp = checkpoint_fingerprint(checkpoint)
    if header["checkpoint_sha256"] != fp:
        raise BaselineError(f"baseline {path} was made from checkpoint {header.get('checkpoint')} "
                         f"(fingerprint {header['checkpoint_sha256'][:12]}), not {checkpoint} ({fp[:12]})")
    check_prompt_set([(p.id, p.text) for p in prompts], [(r["id"], r["prompt"]) for r in rows],
                     f"--score {path}")
    for p, t, r in zip(prompts, ids, rows):
        if list(t) != r["prompt_token_ids"]:
            raise BaselineError(f"prompt {p.id!r} tokenizes to other ids here ({len(t)}) than in the baseline "
                             f"({len(r['prompt_token_ids'])}; chat template there: {header.get('chat')})")
        if not r["completion_token_ids"]:
            raise BaselineError(f"baseline {path}: prompt {p.id!r} has no completion tokens to score")
    return int(header["top_k"]), [(r["completion_token_ids"], r["topk_ids"]) for r in rows]


@dataclass(frozen=True)
class Scoring:
    """What scoring needs: k on every rank; the baseline's targets and the checkpoint fingerprint on rank 0."""

    k: int
    targets: list[tuple] | None = None
    checkpoint_sha256: str = ""
    baseline_sha256: str = ""


def prepare(comm, path: Path, checkpoint: Path, prompt_set) -> Scoring:
    """Rank 0 reads and checks the baseline; a mismatch is a UsageError on every rank."""
    def load() -> Scoring:
        try:
            targets = load_targets(path, checkpoint, prompt_set.prompts, prompt_set.ids)
            return Scoring(*targets, checkpoint_fingerprint(checkpoint), file_sha256(path))
        except BaselineError as exc:
            raise UsageError(str(exc)) from None

    got = on_root(comm, load, share=False)
    k = comm.bcast(got.k if comm.rank == 0 else None, root=0)
    return got if comm.rank == 0 else Scoring(k)


def work_items(ids: list[list[int]], targets: list[tuple] | None,
               sampling: list[Sampling] | None = None) -> list[WorkItem]:
    """One per prompt, in input order; with the baseline's ids and support ids when scoring, and each
    prompt's Sampling (PromptSet.sampling; None: the run's settings)."""
    per_prompt = sampling if sampling is not None else [None] * len(ids)
    if targets is None:
        return [WorkItem(i, t, sampling=s) for i, (t, s) in enumerate(zip(ids, per_prompt))]
    return [WorkItem(i, t, tgt, sup, s) for i, (t, (tgt, sup), s) in enumerate(zip(ids, targets, per_prompt))]


def attach(rows: list[dict], results: list[Result], scoring: Scoring | None) -> list[dict]:
    """Output rows with each result's scores (and the fingerprints they belong to) added as `score`."""
    if scoring is None:
        return rows
    for row, res in zip(rows, results):
        row["score"] = {"checkpoint_sha256": scoring.checkpoint_sha256, "baseline_sha256": scoring.baseline_sha256,
                        **res.score}
    return rows
