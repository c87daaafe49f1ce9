"""DeepSeek-V3: RMSNorm, YaRN RoPE, MLA with a latent cache, noaux_tc Gate, MoE, Block, Transformer.

Module and parameter names equal the HF checkpoint's tensor names (``model.layers.3.self_attn.kv_b_proj.weight``,
``model.layers.3.mlp.experts.17.up_proj.weight``), so the loader needs no renaming. Sharding over the model
group (``group=None``: one device) follows DESIGN.md §4: heads, dense and shared MLP columns, and vocab by
tensor parallelism; routed experts by contiguous ranges (rank r of G owns experts [r*E/G, (r+1)*E/G));
the numerics follow transformers 5.17's DeepseekV3ForCausalLM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .parallel import (ColumnParallelLinear, Linear, ParallelEmbedding, RowParallelLinear, all_reduce,
                       compute_span, group_info, local_slice)

SUB_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers builds them with the default eps


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Rotary dimension whose wavelength fits `rotations` turns into max_pos positions."""
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(m: ModelArgs) -> torch.Tensor:
    """(qk_rope_head_dim/2,) float32 CPU inverse frequencies, YaRN-blended as transformers computes them."""
    dim, base, factor = m.qk_rope_head_dim, m.rope_theta, m.rope_factor
    freq = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)  # (dim/2,)
    extrapolated = 1.0 / freq
    if factor == 1.0:
        return extrapolated
    interpolated = 1.0 / (factor * freq)
    low = max(math.floor(_correction_dim(m.beta_fast, dim, base, m.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(m.beta_slow, dim, base, m.original_seq_len)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled frequency: 1 for fast-rotating dims, 0 for slow ones
    return interpolated * (1 - keep) + extrapolated * keep


def rope_attention_factor(m: ModelArgs) -> float:
    """YaRN's multiplier on cos and sin."""
    if m.mscale and m.mscale_all_dim:
        return yarn_mscale(m.rope_factor, m.mscale) / yarn_mscale(m.rope_factor, m.mscale_all_dim)
    return yarn_mscale(m.rope_factor)


def softmax_scale(m: ModelArgs) -> float:
    scale = m.qk_head_dim ** -0.5
    if m.mscale_all_dim:
        ms = yarn_mscale(m.rope_factor, m.mscale_all_dim)
        scale = scale * ms * ms
    return scale


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, factor: float, dtype):
    """positions (B, T) -> cos, sin (B, T, rope/2) in dtype, angles in float32."""
    angles = positions[..., None].float() * inv_freq  # (B, T, rope/2)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x0, x1), (x2, x3), ... of x (..., rope) by cos/sin (..., rope/2).

    The result is laid out de-interleaved, (rotated evens | rotated odds); q and k get the same layout,
    so their dot product is that of the interleaved rotation.
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def attention_bias(key_mask: torch.Tensor, start: int, seqlen: int, dtype) -> torch.Tensor:
    """(B, 1, T, S) additive mask: 0 where slot s is real and s <= the query's slot, else dtype's min.

    The min is finite, so a query row with no visible key (a left pad) gets a uniform softmax, not NaN.
    """
    end = start + seqlen
    dev = key_mask.device
    causal = torch.arange(end, device=dev)[None, :] <= torch.arange(start, end, device=dev)[:, None]  # (T, S)
    visible = causal[None] & key_mask[:, None, :end]  # (B, T, S)
    bias = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU MLP, gate/up column-parallel, down row-parallel; timed as `name` iff it ends in its all-reduce."""

    def __init__(self, dim: int, inter: int, group, timers, name: str, layer: int, dtype=None,
                 reduce_output: bool = True, device=None):
        super().__init__()
        self.timers, self.name, self.layer = timers, name, layer
        self.gate_proj = ColumnParallelLinear(dim, inter, group, dtype, device=device)
        self.up_proj = ColumnParallelLinear(dim, inter, group, dtype, device=device)
        self.down_proj = RowParallelLinear(inter, dim, group, dtype, reduce_output, name=f"{name}.down",
                                           timers=timers, layer=layer, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with compute_span(self.timers, self.name, self.layer, self.down_proj.reduce_output):
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., inter/G)
        return self.down_proj(h)


class Expert(nn.Module):
    """One routed expert, whole on the rank that owns it."""

    def __init__(self, dim: int, inter: int, dtype=None, device=None):
        super().__init__()
        self.gate_proj = Linear(dim, inter, dtype, device)
        self.up_proj = Linear(dim, inter, dtype, device)
        self.down_proj = Linear(inter, dim, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """noaux_tc router (replicated): sigmoid scores, group-limited top-k on biased scores, unbiased weights."""

    def __init__(self, m: ModelArgs, dtype=None, device=None):
        super().__init__()
        self.top_k, self.n_groups, self.topk_groups = m.n_activated_experts, m.n_expert_groups, m.n_limited_groups
        self.route_scale = m.route_scale
        e = m.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, m.dim, dtype=dtype, device=device), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(e, dtype=torch.float32, device=device),
                                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim) -> weights (N, top_k) float32, expert ids (N, top_k) int64."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = (scores + self.e_score_correction_bias).view(x.shape[0], self.n_groups, -1)  # (N, groups, E/groups)
        group_score = choice.topk(2, dim=-1).values.sum(-1)  # (N, groups)
        kept = group_score.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept, False)
        choice = choice.masked_fill(dropped[..., None], float("-inf")).flatten(1)  # (N, E)
        ids = choice.topk(self.top_k, dim=-1).indices  # (N, top_k)
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.route_scale
        return weights, ids


def _grouped_mm_works(w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for this device, dtype and our layout (e.g. not fp32 on CUDA)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    b = torch.ones(2, 16, 32, dtype=w.dtype, device=w.device).transpose(1, 2)  # (G, K, N) column-major
    a = torch.ones(5, 32, dtype=w.dtype, device=w.device)
    try:
        out = torch._grouped_mm(a, b, offs=torch.tensor([2, 5], dtype=torch.int32, device=w.device))
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 32).all())


class MoE(nn.Module):
    """Routed experts (this rank's range) + shared expert (column/row split), summed by one all-reduce."""

    def __init__(self, layer: int, m: ModelArgs, group, timers, dtype=None, device=None):
        super().__init__()
        rank, size = group_info(group)
        owned = local_slice(m.n_routed_experts, rank, size)
        self.group, self.timers, self.layer = group, timers, layer
        self.n_experts, self.expert_lo, self.expert_hi = m.n_routed_experts, owned.start, owned.stop
        self.gate = Gate(m, dtype, device)
        self.shared_experts = MLP(m.dim, m.moe_inter_dim * m.n_shared_experts, group, timers, "moe.shared",
                                  layer, dtype, reduce_output=False, device=device)
        # keyed by the GLOBAL expert index, so parameter names match the checkpoint's
        self.experts = nn.ModuleDict({str(e): Expert(m.dim, m.moe_inter_dim, dtype, device)
                                      for e in range(owned.start, owned.stop)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        with self.timers.compute("moe.gate", layer=self.layer):
            weights, ids = self.gate(x)  # (N, top_k)
        with self.timers.compute("moe.experts", layer=self.layer):
            y = self.routed(x, weights, ids)  # (N, dim), partial: this rank's experts only
        with self.timers.compute("moe.shared", layer=self.layer):
            y += self.shared_experts(x)  # partial: this rank's columns of the shared expert
        return all_reduce(y, self.group, self.timers, "moe.combine", self.layer).view(shape)

    def pack(self) -> None:
        """Stack the local experts into (E_l, 2I, dim) and (E_l, dim, I) for grouped GEMMs; experts become views."""
        ex = [self.experts[str(e)] for e in range(self.expert_lo, self.expert_hi)]
        if not ex or not hasattr(torch, "_grouped_mm"):
            return
        inter = ex[0].gate_proj.weight.shape[0]
        if not _grouped_mm_works(ex[0].gate_proj.weight):
            return
        self.w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ex])
        self.w2 = torch.stack([e.down_proj.weight for e in ex])
        for i, e in enumerate(ex):  # the per-expert parameters (checkpoint names) now alias the stacks
            e.gate_proj.weight.data, e.up_proj.weight.data = self.w13[i, :inter], self.w13[i, inter:]
            e.down_proj.weight.data = self.w2[i]

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's experts of weight * expert(token), for the tokens routed to each; (N, dim)."""
        grouped = getattr(self, "w13", None) is not None
        return self._routed_grouped(x, weights, ids) if grouped else self._routed_loop(x, weights, ids)

    def _routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Grouped GEMMs over (token, expert) slots sorted by local expert; no host sync, no Python loop."""
        n, k = ids.shape
        flat = ids.flatten()  # (N*k,)
        local = (flat >= self.expert_lo) & (flat < self.expert_hi)
        key = torch.where(local, flat - self.expert_lo, self.w13.shape[0])  # other ranks' slots sort last
        order = key.argsort(stable=True)  # (N*k,) slots grouped by local expert
        counts = torch.zeros(self.w13.shape[0] + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, key, torch.ones_like(key))  # fixed size: bincount would sync to size its output
        offs = counts[:-1].cumsum(0).to(torch.int32)  # (E_l,) end row of each local expert
        xs = x[order // k]  # (N*k, dim); rows past offs[-1] belong to no group and are not computed
        gate, up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        h = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)  # (N*k, dim)
        w = weights.flatten()[order]  # (N*k,) float32
        h = torch.where(local[order, None], h.float() * w[:, None], 0.0).to(x.dtype)
        return torch.zeros_like(h).index_copy_(0, order, h).view(n, k, -1).sum(1)  # slot order: deterministic

    def _routed_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One GEMM pair per local expert that was hit (one host sync for the counts)."""
        y = torch.zeros_like(x)
        flat = ids.flatten()  # (N * top_k,)
        order = flat.argsort(stable=True)  # slots grouped by expert
        tokens, slot_w = order // ids.shape[1], weights.flatten()[order]
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # the one host sync
        pos = sum(counts[:self.expert_lo])
        for e in range(self.expert_lo, self.expert_hi):
            n = counts[e]
            if n:
                tok = tokens[pos:pos + n]
                out = self.experts[str(e)](x[tok]) * slot_w[pos:pos + n, None]  # (n, dim) float32
                y.index_add_(0, tok, out.to(y.dtype))
            pos += n
        return y


class MLA(nn.Module):
    """Multi-head latent attention over a cache of normalized latents and rotated shared keys."""

    def __init__(self, layer: int, m: ModelArgs, group, timers, dtype=None, device=None):
        super().__init__()
        _, size = group_info(group)
        if m.n_heads % size:
            raise ValueError(f"n_heads={m.n_heads} not divisible by group size {size}")
        self.n_local_heads, self.timers, self.layer = m.n_heads // size, timers, layer
        self.nope, self.rope, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.rank, self.q_lora = m.kv_lora_rank, bool(m.q_lora_rank)
        self.softmax_scale = softmax_scale(m)
        heads_qk = m.n_heads * m.qk_head_dim
        if self.q_lora:
            self.q_a_proj = Linear(m.dim, m.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, SUB_NORM_EPS, dtype, device)
            self.q_b_proj = ColumnParallelLinear(m.q_lora_rank, heads_qk, group, dtype, device=device)
        else:
            self.q_proj = ColumnParallelLinear(m.dim, heads_qk, group, dtype, device=device)
        self.kv_a_proj_with_mqa = Linear(m.dim, m.kv_lora_rank + m.qk_rope_head_dim, dtype, device)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, SUB_NORM_EPS, dtype, device)
        self.kv_b_proj = ColumnParallelLinear(m.kv_lora_rank, m.n_heads * (m.qk_nope_head_dim + m.v_head_dim),
                                              group, dtype, device=device)
        self.o_proj = RowParallelLinear(m.n_heads * m.v_head_dim, m.dim, group, dtype, name="attn.o_proj",
                                        timers=timers, layer=layer, device=device)

    def forward(self, x, rope, bias, kv_cache, pe_cache, start: int, naive: bool) -> torch.Tensor:
        """Timed attend + o_proj (with its all-reduce); x (B, T, dim) already normalized."""
        with self.timers.compute("attn", layer=self.layer):
            a = self.attend(x, rope, bias, kv_cache, pe_cache, start, naive)
        return self.o_proj(a)

    def attend(self, x, rope, bias, kv_cache, pe_cache, start: int, naive: bool) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, n_local_heads * v_head_dim); writes slots start..start+T-1 of the caches."""
        bsz, seqlen, _ = x.shape
        end = start + seqlen
        cos, sin = rope  # (B, T, rope/2)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(bsz, seqlen, self.n_local_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])  # (B, T, n_local_heads, rope)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        kv_cache[:, start:end] = self.kv_a_layernorm(latent)  # (B, T, kv_lora_rank)
        pe_cache[:, start:end] = apply_rope(k_pe, cos, sin)  # (B, T, rope)
        kv, pe = kv_cache[:, :end], pe_cache[:, :end]  # (B, S, kv_lora_rank), (B, S, rope)
        attend = self._naive if naive else self._absorb
        return attend(q_nope, q_pe, kv, pe, bias).flatten(2)

    def _naive(self, q_nope, q_pe, kv, pe, bias) -> torch.Tensor:
        """Expand the latents through kv_b_proj into per-head keys and values; (B, T, H_l, v_head_dim)."""
        bsz, slen, _ = kv.shape
        k_nope, v = self.kv_b_proj(kv).view(bsz, slen, self.n_local_heads, -1).split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, pe[:, :, None].expand(-1, -1, self.n_local_heads, -1)], dim=-1)  # (B, S, H_l, qk)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H_l, qk)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bias, scale=self.softmax_scale)  # (B, H_l, T, v)
        return o.transpose(1, 2)

    def _absorb(self, q_nope, q_pe, kv, pe, bias) -> torch.Tensor:
        """Fold kv_b_proj into the query and the output; attention runs on the latents; (B, T, H_l, v_head_dim)."""
        w = self.kv_b_proj.weight.view(self.n_local_heads, self.nope + self.v_dim, self.rank)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w[:, :self.nope])  # (B, T, H_l, kv_lora_rank)
        scores = torch.einsum("bthc,bsc->bhts", q_latent, kv) + torch.einsum("bthr,bsr->bhts", q_pe, pe)
        probs = torch.softmax(scores.float() * self.softmax_scale + bias.float(), dim=-1)  # (B, H_l, T, S)
        probs = probs.to(kv.dtype)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, kv)  # (B, T, H_l, kv_lora_rank)
        return torch.einsum("bthc,hvc->bthv", o_latent, w[:, self.nope:])


class Block(nn.Module):
    def __init__(self, layer: int, m: ModelArgs, group, timers, dtype=None, device=None):
        super().__init__()
        self.layer, self.timers = layer, timers
        self.self_attn = MLA(layer, m, group, timers, dtype, device)
        if layer < m.n_dense_layers:
            self.mlp = MLP(m.dim, m.inter_dim, group, timers, "mlp", layer, dtype, device=device)
        else:
            self.mlp = MoE(layer, m, group, timers, dtype, device)
        self.input_layernorm = RMSNorm(m.dim, m.norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(m.dim, m.norm_eps, dtype, device)

    def forward(self, x, rope, bias, cache: "Cache", start: int, naive: bool) -> torch.Tensor:
        with self.timers.compute("attn", layer=self.layer):
            a = self.self_attn.attend(self.input_layernorm(x), rope, bias, cache.kv[self.layer],
                                      cache.pe[self.layer], start, naive)
        a = self.self_attn.o_proj(a)  # (B, T, dim), all-reduced
        with self.timers.compute("norm", layer=self.layer):
            x = x + a
            h = self.post_attention_layernorm(x)
        return x + self.mlp(h)


@dataclass
class Cache:
    """Per-layer latent cache: kv[L] (bsz, max_len, kv_lora_rank) normalized latents, pe[L] (bsz, max_len, rope)."""

    kv: list[torch.Tensor]
    pe: list[torch.Tensor]


class Decoder(nn.Module):
    def __init__(self, m: ModelArgs, group, timers, dtype=None, device=None):
        super().__init__()
        self.embed_tokens = ParallelEmbedding(m.vocab_size, m.dim, group, dtype, timers, "embed", device)
        self.layers = nn.ModuleList(Block(i, m, group, timers, dtype, device) for i in range(m.n_layers))
        self.norm = RMSNorm(m.dim, m.norm_eps, dtype, device)


class Transformer(nn.Module):
    """The whole model (MTP layers skipped); logits are float32, full vocab, the same on every rank."""

    def __init__(self, margs: ModelArgs, group, timers, dtype=torch.float32, device=None):
        super().__init__()
        self.margs, self.group, self.timers, self.dtype = margs, group, timers, dtype
        self.rope_factor = rope_attention_factor(margs)
        self.model = Decoder(margs, group, timers, dtype, device)
        self.lm_head = ColumnParallelLinear(margs.dim, margs.vocab_size, group, dtype, gather_output=True,
                                            timers=timers, name="head", device=device)
        self.register_buffer("rope_inv_freq", torch.empty(0, device=device), persistent=False)
        self.init_buffers(self.rope_inv_freq.device)

    def pack_experts(self) -> str:
        """After loading: stack each MoE layer's local experts for grouped GEMMs; returns the path in use."""
        moes = [b.mlp for b in self.model.layers if isinstance(b.mlp, MoE)]
        for moe in moes:
            moe.pack()
        return "grouped" if moes and getattr(moes[0], "w13", None) is not None else "loop"

    def init_buffers(self, device) -> None:
        """(Re)compute the non-persistent buffers, e.g. after meta construction and to_empty()."""
        self.rope_inv_freq = yarn_inv_freq(self.margs).to(device)

    def new_cache(self, bsz: int, max_len: int) -> Cache:
        m, dev = self.margs, self.lm_head.weight.device
        kv = [torch.zeros(bsz, max_len, m.kv_lora_rank, dtype=self.dtype, device=dev) for _ in range(m.n_layers)]
        pe = [torch.zeros(bsz, max_len, m.qk_rope_head_dim, dtype=self.dtype, device=dev) for _ in range(m.n_layers)]
        return Cache(kv, pe)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: Cache,
                start: int, naive: bool | None = None, all_positions: bool = False) -> torch.Tensor:
        """tokens/positions (B, T) in cache slots start..start+T-1, key_mask (B, >= start+T) -> (B, vocab).

        naive (default: start == 0) expands the latents, else kv_b_proj is absorbed; all_positions
        returns (B, T, vocab).
        """
        naive = start == 0 if naive is None else naive
        h = self.model.embed_tokens(tokens)  # (B, T, dim)
        with self.timers.compute("rope"):
            rope = rope_cos_sin(self.rope_inv_freq, positions, self.rope_factor, h.dtype)
            bias = attention_bias(key_mask, start, tokens.shape[1], h.dtype)  # (B, 1, T, S)
        for block in self.model.layers:
            h = block(h, rope, bias, cache, start, naive)
        with self.timers.compute("norm"):
            h = self.model.norm(h if all_positions else h[:, -1])  # (B, dim) or (B, T, dim)
        return self.lm_head(h).float()
