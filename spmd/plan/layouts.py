"""Layouts of a model on GPUs: the family (tp or dpa), group size G, pipeline stages P, replicas R; which
ones the program can run for a model, and which FP8 tensors a tp group must dequantize.

- tp: attention heads, dense MLP, shared expert, embedding and head split over G (tensor parallel), routed
  experts in contiguous ranges, combined by all-reduce; every rank holds the latent cache of all the
  group's rows. Kept-FP8 shards must fall on 128-row blocks; a tensor whose shard does not is counted
  dequantized to bf16 (``unaligned``).
- dpa: data-parallel attention: every rank holds all MLA weights, the dense MLP, the shared expert, the
  embedding and the head, and runs only its batch/G rows (its own latent cache); routed experts in
  contiguous ranges (E/G per rank), reached by all-to-all dispatch/combine.
GPUs = R x P x G. With P > 1 a stage's G ranks share a host (spmd.parallel.pipeline.check_placement).
"""
from __future__ import annotations

from dataclasses import dataclass

from spmd.config import FP8_BLOCK, ModelArgs

FAMILIES = ("tp", "dpa")
STAGES = (1, 2, 3, 4, 6, 8)  # pipeline stages the planner tries (3 and 6 for 3 and 6 nodes; more only adds bubble)


@dataclass(frozen=True)
class Layout:
    group: int            # G: ranks of one stage (tensor/expert parallel, or data-parallel attention + EP)
    pp: int = 1           # P stages
    micro: int = 1        # M micro-batches (pipelines)
    replicas: int = 1
    family: str = "tp"    # "tp" | "dpa"

    @property
    def gpus(self) -> int:
        return self.group * self.pp * self.replicas

    @property
    def name(self) -> str:
        s = ("dpa" if self.family == "dpa" else "") + f"G{self.group}"
        s += f"xP{self.pp}(M{self.micro})" if self.pp > 1 else ""
        return (f"{self.replicas}x" if self.replicas > 1 else "") + s


def fp8_shards(m: ModelArgs, group: int) -> dict[str, int]:
    """Rows (or columns) of each FP8 tensor that tp splits, per rank at group size `group`."""
    return {"q_b_proj": m.n_heads // group * m.qk_head_dim, "o_proj": m.n_heads // group * m.v_head_dim,
            "dense_mlp": m.inter_dim // group, "shared_expert": m.moe_inter_dim * m.n_shared_experts // group}


def unaligned(m: ModelArgs, group: int) -> tuple[str, ...]:
    """The FP8 tensors whose tp shards do not fall on 128-blocks at this group size: the program dequantizes
    them to bf16 (kv_b_proj is bf16 anyway: the absorbed decode uses it as a plain matrix)."""
    if group == 1:
        return ()
    return tuple(name for name, rows in fp8_shards(m, group).items() if rows % FP8_BLOCK)


def invalid(m: ModelArgs, family: str, group: int) -> str | None:
    """Why this model cannot be split `family`-wise over `group` ranks (None: it can)."""
    if family == "dpa":
        sizes = [("n_routed_experts", m.n_routed_experts)]
    else:
        sizes = [("n_heads", m.n_heads), ("n_routed_experts", m.n_routed_experts), ("vocab_size", m.vocab_size),
                 ("intermediate_size", m.inter_dim), ("shared expert intermediate",
                                                      m.moe_inter_dim * m.n_shared_experts)]
    for name, n in sizes:
        if n % group:
            return f"{name}={n} not divisible by group size {group}"
    return None


def _powers(limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= 2
    return out


DPA_STAGES = False  # the program runs dpa with one stage only (spmd.config.cli.check_dpa)


def candidates(m: ModelArgs, gpus: int, gpus_per_node: int, batch: int) -> list[Layout]:
    """Every layout of both families that uses exactly `gpus` GPUs: G a power of two or a multiple of the
    GPUs per node (groups aligned to nodes), P in STAGES with a stage on one host when P > 1, M = P
    micro-batches, R = gpus / (G P); at least one row per micro-batch (dpa: per rank). dpa with G = 1 is
    tp with G = 1 (one GPU holds everything): listed once, as tp. dpa with pipeline stages is modelled
    (perf.step_s) but not built by the program (--group-layout dpa needs --pp 1): left out unless
    DPA_STAGES."""
    groups = sorted({g for g in _powers(gpus) + list(range(gpus_per_node, gpus + 1, gpus_per_node))
                     if gpus % g == 0 and (gpus_per_node % g == 0 or g % gpus_per_node == 0)})
    out = []
    for family in FAMILIES:
        for g in groups:
            if invalid(m, family, g) or (family == "dpa" and g == 1):
                continue
            for p in (p for p in STAGES if p <= m.n_layers):
                if gpus % (g * p) or (p > 1 and gpus_per_node % g):
                    continue
                if batch < p * (g if family == "dpa" else 1) or (family == "dpa" and p > 1 and not DPA_STAGES):
                    continue
                out.append(Layout(g, p, p, gpus // (g * p), family))
    return out
