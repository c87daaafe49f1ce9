"""DeepSeek-V3: RMSNorm, YaRN RoPE, MLA with a latent cache, Block, Transformer (the MLPs and MoE: spmd.model.moe).

Module and parameter names equal the HF checkpoint's tensor names (``model.layers.3.self_attn.kv_b_proj.weight``,
``model.layers.3.mlp.experts.17.up_proj.weight``), so the loader needs no renaming. Sharding over the model
group ``tp`` (a ``spmd.parallel.comm.Group``; ``Group()``: one device) follows DESIGN.md §4: heads, dense
and shared MLP columns, and vocab by tensor parallelism; routed experts by contiguous ranges (rank r of G
owns experts [r*E/G, (r+1)*E/G)); the numerics follow transformers 5.17's DeepseekV3ForCausalLM. The
compute spans named here are recorded once an engine attaches its timers
(``spmd.parallel.comm.attach_timers``); until then each is a null context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spmd.kernels import fused
from spmd.config import ModelArgs
from spmd.kernels.fp8 import triton_available, w8a8_dense
from spmd.kernels.mla_decode import mla_decode
from spmd.model.moe import MLP, MoE
from spmd.parallel.comm import UNTIMED, Group
from spmd.parallel.layers import (ColumnParallelLinear, Linear, ParallelEmbedding, RowParallelLinear, fp8_copy,
                                  matmul, pack_weights)

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


def attention_bias(key_mask: torch.Tensor | None, start, seqlen: int, dtype, n_keys: int | None = None,
                   device=None) -> torch.Tensor:
    """(B or 1, 1, T, S) additive mask: 0 where slot s is real and s <= the query's slot, else dtype's min.

    start: an int (S = start + T), or a device tensor for static shapes (S = n_keys, every slot of the
    cache, nothing read back to the host: what a captured CUDA graph needs), either (1,) (every row at the
    same slot) or (B,) (each row at its own slot: continuous batching). key_mask (B, >= S) marks the real
    slots; None: every slot below the query is real. The min is finite, so a query row with no visible
    key (a left pad) gets a uniform softmax, not NaN.
    """
    if isinstance(start, torch.Tensor):
        dev = start.device
        n_keys = key_mask.shape[1] if key_mask is not None else n_keys
        queries = start[:, None] + torch.arange(seqlen, device=dev)  # (1 or B, T)
        keys = torch.arange(n_keys, device=dev)
    else:
        dev = key_mask.device if key_mask is not None else device
        keys, queries = torch.arange(start + seqlen, device=dev), torch.arange(start, start + seqlen, device=dev)[None]
        key_mask = key_mask[:, :start + seqlen] if key_mask is not None else None
    visible = keys <= queries[:, :, None]  # (1 or B, T, S)
    if key_mask is not None:
        visible = visible & key_mask[:, None, :]
    bias = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[:, None]


def use_fused(model: nn.Module, on: bool) -> None:
    """Switch the Triton-fused small ops (spmd/kernels/fused.py: RMSNorm, the router) of every module of model.
    NativeEngine turns them on when decode steps replay CUDA graphs (and in "static" mode, which runs the
    graph's ops eagerly): one launch instead of five or eighteen inside a graph, where launches cost GPU
    time. Eager steps keep torch's ops: from Python a Triton launch costs more host time than the few aten
    launches it replaces (H200, slice, batch 1 eager: 8.68 ms per step with them, 5.65 without, in two
    calls; README, "Fused small ops").

    Availability is decided here, once per module: CUDA parameters, Triton importable, and a shape the
    kernel takes (``fused_fits``); forward then checks only the flag (and RMSNorm the input's dtype)."""
    for mod in model.modules():
        if hasattr(mod, "fused"):
            dev = next(mod.parameters()).device
            ok = bool(dev.type == "cuda" and triton_available(dev) and mod.fused_fits())
            mod.fused, mod.fused_ok = on and ok, ok



class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps, self.fused, self.fused_ok = eps, False, False
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def fused_fits(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == self.weight.dtype:  # one kernel, not five (use_fused)
            return fused.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm): one kernel where the fused ops run (use_fused; eager steps of
        FUSED_ROWS tokens or more), the same sum and norm as torch's add and this module's forward."""
        if fused.fused_for(self, x.shape[:-1].numel()) and x.dtype == self.weight.dtype:
            return fused.norm(x, self.weight, self.eps, residual)
        x = x + residual
        return x, self(x)


class MLA(nn.Module):
    """Multi-head latent attention over a cache of normalized latents and rotated shared keys."""

    timers = UNTIMED  # attach_timers

    def __init__(self, layer: int, m: ModelArgs, tp: Group, dtype=None, device=None):
        super().__init__()
        if m.n_heads % tp.size:
            raise ValueError(f"n_heads={m.n_heads} not divisible by group size {tp.size}")
        self.n_local_heads, self.layer = m.n_heads // tp.size, layer
        self.nope, self.rope, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.rank, self.q_lora = m.kv_lora_rank, bool(m.q_lora_rank)
        self.softmax_scale = softmax_scale(m)
        heads_qk = m.n_heads * m.qk_head_dim
        if self.q_lora:
            self.q_a_proj = Linear(m.dim, m.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, SUB_NORM_EPS, dtype, device)
            self.q_b_proj = ColumnParallelLinear(m.q_lora_rank, heads_qk, tp, dtype, device=device)
        else:
            self.q_proj = ColumnParallelLinear(m.dim, heads_qk, tp, dtype, device=device)
        self.kv_a_proj_with_mqa = Linear(m.dim, m.kv_lora_rank + m.qk_rope_head_dim, dtype, device)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, SUB_NORM_EPS, dtype, device)
        self.kv_b_proj = ColumnParallelLinear(m.kv_lora_rank, m.n_heads * (m.qk_nope_head_dim + m.v_head_dim),
                                              tp, dtype, device=device)
        self.kv_b_proj.fp8_ok = False  # absorbed into q and the output as a plain matrix (`_absorb`)
        self.fused = self.fused_ok = False  # rope and the keys in Triton (use_fused, fused_for)
        self.q_rank, self.wa, self.sa = m.q_lora_rank, None, None  # wa, sa: q_a and kv_a as one GEMM (pack)
        self.kv_b_q = self.kv_b_s = None  # kv_b_proj's weight in FP8 for FP8 x FP8 prefill (pack)
        self.o_proj = RowParallelLinear(m.n_heads * m.v_head_dim, m.dim, tp, dtype, name="attn.o_proj",
                                        layer=layer, device=device)

    def fused_fits(self) -> bool:
        return self.rope % 2 == 0

    def pack(self) -> None:
        """q_a_proj and kv_a_proj_with_mqa read the same x: one (q_lora_rank + rank + rope, dim) GEMM, one
        quantization of x for FP8 x FP8 (q_lora_rank is a multiple of 128, so the scale blocks align). And
        kv_b_proj, kept in 16 bits for the absorbed decode path, gets an FP8 copy for prefill's expansion of
        the latents (`_naive`) where the model keeps FP8 weights and it re-quantizes exactly (fp8_copy)."""
        if self.q_lora:
            packed = pack_weights([self.q_a_proj, self.kv_a_proj_with_mqa])
            if packed is not None:
                self.wa, self.sa = packed
        if w8a8_dense(1 << 62, self.kv_b_proj.weight.dtype):  # FP8 x FP8 runs here at all (not on sm_80)
            self.kv_b_q, self.kv_b_s = fp8_copy(self.kv_b_proj.weight, like=self.o_proj.weight)

    def forward(self, x, rope, bias, kv_cache, pe_cache, start, naive: bool) -> torch.Tensor:
        """Timed attend + o_proj (with its all-reduce); x (B, T, dim) already normalized."""
        with self.timers.compute("attn", layer=self.layer):
            a = self.attend(x, rope, bias, kv_cache, pe_cache, start, naive)
        return self.o_proj(a)

    def attend(self, x, rope, bias, kv_cache, pe_cache, start, naive: bool) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, n_local_heads * v_head_dim); writes slots start..start+T-1 of the caches."""
        bsz, seqlen, _ = x.shape
        cos, sin = rope  # (B or 1, T, rope/2)
        if self.wa is not None:  # packed: (B, T, q_lora_rank + rank + rope) from one GEMM
            q_a, latent, k_pe = matmul(x, self.wa, self.sa).split([self.q_rank, self.rank, self.rope], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
            latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        q = q.view(bsz, seqlen, self.n_local_heads, -1)  # (B, T, n_local_heads, qk)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        glue = fused.fused_for(self, bsz * seqlen) and x.dtype in (torch.bfloat16, torch.float16) and cos.dtype == x.dtype
        if glue:  # q's rope part rotated in place: q is then the attention's query, no concatenation
            fused.rope(q_pe, cos, sin, out=q_pe)
            k_pe = fused.rope(k_pe, cos, sin)
        else:
            q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])  # (B, T, n_local_heads, rope)
            q, k_pe = None, apply_rope(k_pe, cos, sin)
        latent = self.kv_a_layernorm(latent)  # (B, T, rank); k_pe (B, T, rope)
        if isinstance(start, torch.Tensor):  # static shapes: write at device-side slots, attend to all slots
            rows = torch.arange(bsz, device=x.device)[:, None]  # start (1,): one slot for all rows; (B,): its own
            slots = start[:, None] + torch.arange(seqlen, device=x.device)  # (1 or B, T)
            kv, pe = kv_cache.index_put_((rows, slots), latent), pe_cache.index_put_((rows, slots), k_pe)
        else:
            kv_cache[:, start:start + seqlen], pe_cache[:, start:start + seqlen] = latent, k_pe
            kv, pe = kv_cache[:, :start + seqlen], pe_cache[:, :start + seqlen]  # (B, S, rank), (B, S, rope)
        if bias is None:  # continuous decode, Transformer.varlen_decode: row b sees its columns 0..start[b]
            return self._absorb_varlen(q_nope, q_pe, kv, pe, start + 1).flatten(2)
        if naive:
            return self._naive(q_nope, q_pe, kv, pe, bias, q).flatten(2)
        return self._absorb(q_nope, q_pe, kv, pe, bias).flatten(2)

    def _naive(self, q_nope, q_pe, kv, pe, bias, q=None) -> torch.Tensor:
        """Expand the latents through kv_b_proj into per-head keys and values; (B, T, H_l, v_head_dim).
        q: the whole query (B, T, H_l, qk) where attend made it in place (its fused path, which also
        builds the keys in one kernel); else q_nope and q_pe are concatenated."""
        bsz, slen, _ = kv.shape
        if self.kv_b_q is not None and w8a8_dense(bsz * slen, kv.dtype):  # FP8 x FP8 (pack)
            kv = matmul(kv, self.kv_b_q, self.kv_b_s)
        else:
            kv = self.kv_b_proj(kv)
        k_nope, v = kv.view(bsz, slen, self.n_local_heads, -1).split([self.nope, self.v_dim], -1)
        if q is not None:
            k = fused.mla_keys(k_nope, pe)
        else:
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


    def _absorb_varlen(self, q_nope, q_pe, kv, pe, lens) -> torch.Tensor:
        """One query per row (T = 1) over each row's own lens[b] columns (spmd.kernels.mla_decode);
        (B, 1, H_l, v_head_dim)."""
        w = self.kv_b_proj.weight.view(self.n_local_heads, self.nope + self.v_dim, self.rank)
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w[:, :self.nope])  # (B, H_l, kv_lora_rank)
        o_latent = mla_decode(q_latent, q_pe[:, 0], kv, pe, lens, self.softmax_scale)
        return torch.einsum("bhc,hvc->bhv", o_latent, w[:, self.nope:])[:, None]


class Block(nn.Module):
    timers = UNTIMED  # attach_timers

    def __init__(self, layer: int, m: ModelArgs, tp: Group, dtype=None, device=None, ep: Group | None = None):
        super().__init__()
        self.layer = layer
        self.self_attn = MLA(layer, m, tp, dtype, device)
        if layer < m.n_dense_layers:
            self.mlp = MLP(m.dim, m.inter_dim, tp, "mlp", layer, dtype, device=device)
        else:
            self.mlp = MoE(layer, m, tp, dtype, device, ep)
        self.input_layernorm = RMSNorm(m.dim, m.norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(m.dim, m.norm_eps, dtype, device)

    def forward(self, x, rope, bias, cache: "Cache", start, naive: bool) -> torch.Tensor:
        with self.timers.compute("attn", layer=self.layer):
            a = self.self_attn.attend(self.input_layernorm(x), rope, bias, cache.kv[self.layer],
                                      cache.pe[self.layer], start, naive)
        a = self.self_attn.o_proj(a)  # (B, T, dim), all-reduced
        with self.timers.compute("norm", layer=self.layer):  # the residual add and the norm: one kernel
            x, h = self.post_attention_layernorm.add_norm(x, a)
        return x + self.mlp(h)


@dataclass
class Cache:
    """Per-layer latent cache: kv[L] (bsz, max_len, kv_lora_rank) normalized latents, pe[L] (bsz, max_len, rope)."""

    kv: list[torch.Tensor]
    pe: list[torch.Tensor]


class Decoder(nn.Module):
    """Embedding (first stage), the blocks of `layers` (other indices hold parameter-free placeholders,
    so names keep their checkpoint layer index), final norm (last stage)."""

    def __init__(self, m: ModelArgs, tp: Group, dtype=None, device=None, layers: range | None = None,
                 first: bool = True, last: bool = True, ep: Group | None = None):
        super().__init__()
        layers = range(m.n_layers) if layers is None else layers
        if first:
            self.embed_tokens = ParallelEmbedding(m.vocab_size, m.dim, tp, dtype, "embed", device)
        self.layers = nn.ModuleList(Block(i, m, tp, dtype, device, ep) if i in layers else nn.Module()
                                    for i in range(m.n_layers))
        if last:
            self.norm = RMSNorm(m.dim, m.norm_eps, dtype, device)


class Transformer(nn.Module):
    """The whole model (MTP layers skipped), or one pipeline stage of it: `layers` (a contiguous range),
    the embedding when `first`, final norm and head when `last`. Logits are float32, full vocab, the same
    on every rank of the (tensor-parallel) group `tp`; a stage that is not last returns its hidden states."""

    timers = UNTIMED  # attach_timers
    varlen_decode = False  # continuous decode steps through spmd.kernels.mla_decode (--mla-decode, auto on CUDA)

    def __init__(self, margs: ModelArgs, tp: Group, dtype=torch.float32, device=None,
                 layers: range | None = None, first: bool = True, last: bool = True, ep: Group | None = None):
        """tp: the tensor-parallel group; ep (the dpa layout, tp then one device): the expert-parallel
        group over which routed experts are split and reached by all-to-all (spmd.parallel.ep)."""
        super().__init__()
        self.margs, self.tp, self.ep, self.dtype = margs, tp, ep, dtype
        self.stage_layers = range(margs.n_layers) if layers is None else layers
        self.first, self.last = first, last
        self.rope_factor = rope_attention_factor(margs)
        self.model = Decoder(margs, tp, dtype, device, self.stage_layers, first, last, ep)
        if last:
            self.lm_head = ColumnParallelLinear(margs.dim, margs.vocab_size, tp, dtype, gather_output=True,
                                                name="head", device=device)
        self.register_buffer("rope_inv_freq", torch.empty(0, device=device), persistent=False)
        self.init_buffers(self.rope_inv_freq.device)

    def blocks(self) -> list["Block"]:
        """This stage's blocks, in order."""
        return [self.model.layers[i] for i in self.stage_layers]

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this stage (the loader skips the others' silently)."""
        if name.startswith("model.layers."):
            return int(name.split(".", 3)[2]) in self.stage_layers
        if name.startswith("model.embed_tokens."):
            return self.first
        return self.last if name.startswith(("model.norm.", "lm_head.")) else True

    def pack_linears(self) -> int:
        """Linears that read one input as one GEMM (MLA's q_a and kv_a, each MLP's gate and up: see their
        pack); returns how many groups were packed. The engine packs on CUDA: on CPU the fp32 reference
        path keeps its GEMMs as transformers has them."""
        mods = []
        for block in self.blocks():
            mods.append(block.self_attn)
            mods.append(block.mlp.shared_experts if isinstance(block.mlp, MoE) else block.mlp)
        for mod in mods:
            mod.pack()
        return sum(getattr(mod, "wa", None) is not None or getattr(mod, "w13", None) is not None for mod in mods)

    def fp8_kv_b(self) -> int:
        """How many layers have kv_b_proj's FP8 copy (MLA.pack)."""
        return sum(block.self_attn.kv_b_q is not None for block in self.blocks())

    def pack_experts(self) -> str:
        """After loading: stack each MoE layer's local experts for grouped GEMMs; returns the path in use."""
        moes = [b.mlp for b in self.blocks() if isinstance(b.mlp, MoE)]
        for moe in moes:
            moe.pack()
        if not moes or getattr(moes[0], "w13", None) is None:
            return "loop"
        return "grouped-fp8" if getattr(moes[0], "s13", None) is not None else "grouped"

    def init_buffers(self, device) -> None:
        """(Re)compute the non-persistent buffers, e.g. after meta construction and to_empty()."""
        self.rope_inv_freq = yarn_inv_freq(self.margs).to(device)

    def new_cache(self, bsz: int, max_len: int) -> Cache:
        """The latent cache of this stage's layers (other layers get empty tensors)."""
        m, dev = self.margs, self.rope_inv_freq.device

        def per_layer(width: int) -> list[torch.Tensor]:
            return [torch.zeros(bsz, max_len if i in self.stage_layers else 0, width, dtype=self.dtype, device=dev)
                    for i in range(m.n_layers)]

        return Cache(per_layer(m.kv_lora_rank), per_layer(m.qk_rope_head_dim))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: Cache,
                start, naive: bool | None = None, all_positions: bool = False,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """tokens/positions (B, T) in cache slots start..start+T-1, key_mask (B, >= start+T) -> (B, vocab).

        start: int, or a (1,) or (B,) device tensor for static shapes (attention over every cache slot, masked
        by key_mask, or, if None, by each row's start: the form a CUDA graph captures). naive (default: start == 0) expands the latents, else
        kv_b_proj is absorbed; all_positions returns (B, T, vocab). A stage after the first takes the
        previous stage's `hidden` (B, T, dim) instead of embedding `tokens` (still read for their shape);
        a stage before the last returns its hidden states (B, T, dim).
        """
        naive = isinstance(start, int) and start == 0 if naive is None else naive
        h = self.model.embed_tokens(tokens) if self.first else hidden  # (B, T, dim)
        with self.timers.compute("rope"):
            rope = rope_cos_sin(self.rope_inv_freq, positions, self.rope_factor, h.dtype)
            n_keys = cache.kv[self.stage_layers.start].shape[1]
            per_row = isinstance(start, torch.Tensor) and start.numel() == tokens.shape[0]  # each row its column
            if self.varlen_decode and key_mask is None and per_row and tokens.shape[1] == 1:
                bias = None  # MLA attends over each row's own columns (spmd.kernels.mla_decode)
            else:
                bias = attention_bias(key_mask, start, tokens.shape[1], h.dtype, n_keys, h.device)  # (B|1,1,T,S)
        for block in self.blocks():
            h = block(h, rope, bias, cache, start, naive)
        if not self.last:
            return h
        with self.timers.compute("norm"):
            h = self.model.norm(h if all_positions else h[:, -1])  # (B, dim) or (B, T, dim)
        return self.lm_head(h).float()
