"""The MLPs: SwiGLU MLP (dense layers, shared expert), noaux_tc Gate, Expert, and MoE over this rank's contiguous range of experts.

Rank r of a group of G owns experts [r*E/G, (r+1)*E/G), named by their global index so the loader reads
them by checkpoint name; the shared expert is split like a dense MLP; one all-reduce, ``tp.all_reduce("moe.combine", ...)``,
sums both. Routed
experts run as grouped GEMMs over the (token, expert) slots sorted by local expert (`torch._grouped_mm`,
or the Triton FP8 kernel for kept FP8 weights), with no host synchronisation, so a CUDA graph can capture
them; where neither runs (e.g. fp32 on CUDA), a per-expert loop with one host sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spmd.kernels import fused
from spmd.config import ModelArgs
from spmd.parallel.comm import UNTIMED, Group
from spmd.parallel.ep import combine, dispatch
from spmd.parallel.layers import (ColumnParallelLinear, Linear, RowParallelLinear, local_slice, matmul, own_span,
                                  pack_weights)


class MLP(nn.Module):
    """SwiGLU MLP, gate/up column-parallel, down row-parallel; timed as `name` iff it ends in its all-reduce."""

    timers = UNTIMED  # attach_timers

    def __init__(self, dim: int, inter: int, tp: Group, name: str, layer: int, dtype=None,
                 reduce_output: bool = True, device=None):
        super().__init__()
        self.name, self.layer = name, layer
        self.gate_proj = ColumnParallelLinear(dim, inter, tp, dtype, device=device)
        self.up_proj = ColumnParallelLinear(dim, inter, tp, dtype, device=device)
        self.down_proj = RowParallelLinear(inter, dim, tp, dtype, reduce_output, name=f"{name}.down",
                                           layer=layer, device=device)
        self.w13 = self.s13 = None  # gate and up as one GEMM (pack)
        self.fused = self.fused_ok = False  # silu * up in Triton (spmd.model.transformer.use_fused)

    def fused_fits(self) -> bool:
        return True

    def a8_input(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether the input's GEMM (gate and up packed, FP8) runs FP8 x FP8 for `rows` tokens."""
        from spmd.kernels.fp8 import w8a8_dense
        return self.w13 is not None and self.w13.dtype == torch.float8_e4m3fn and w8a8_dense(rows, dtype)

    def pack(self) -> None:
        """gate_proj and up_proj as one (2 inter/G, dim) GEMM: one read of x (one quantization of it for
        FP8 x FP8), and silu * up from its output in one kernel (spmd.kernels.fused.silu_mul)."""
        packed = pack_weights([self.gate_proj, self.up_proj])
        if packed is not None:
            self.w13, self.s13 = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_span(self, self.down_proj.reduce_output):
            if self.w13 is None:
                h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., inter/G)
            else:
                gate_up = matmul(x, self.w13, self.s13)  # (..., 2 inter/G)
                lead, rows = gate_up.shape[:-1], gate_up.numel() // gate_up.shape[-1]
                if fused.fused_for(self, rows) and gate_up.dtype in (torch.bfloat16, torch.float16):
                    from spmd.kernels.fp8 import MODE, Quantized, w8a8_dense
                    wd = self.down_proj.weight
                    if (MODE.fused_quant and wd.dtype == torch.float8_e4m3fn and w8a8_dense(rows, gate_up.dtype)
                            and wd.shape[1] % 128 == 0):
                        # the FP8 x FP8 down projection's input, quantized by the same kernel (one pass)
                        q, s = fused.silu_mul(gate_up.view(rows, -1), quant=True, ue8m0=MODE.ue8m0, pad4=True)
                        h = Quantized(q, s, torch.Size((*lead, wd.shape[1])), gate_up.dtype)
                    else:
                        h = fused.silu_mul(gate_up.view(rows, -1)).view(*lead, -1)
                else:
                    gate, up = gate_up.chunk(2, dim=-1)
                    h = F.silu(gate) * up
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


_MM_OUT_DTYPE = [True]  # torch.mm(bf16, bf16, out_dtype=float32) on CUDA: False once this build refuses it


class Gate(nn.Module):
    """noaux_tc router (replicated): sigmoid scores, group-limited top-k on biased scores, unbiased weights."""

    def __init__(self, m: ModelArgs, dtype=None, device=None):
        super().__init__()
        self.top_k, self.n_groups, self.topk_groups = m.n_activated_experts, m.n_expert_groups, m.n_limited_groups
        self.route_scale, self.fused = m.route_scale, False  # fused: see spmd.model.transformer.use_fused
        e = m.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, m.dim, dtype=dtype, device=device), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(e, dtype=torch.float32, device=device),
                                                    requires_grad=False)

    def fused_fits(self) -> bool:
        return fused.route_fits(self.weight.shape[0], self.n_groups, self.top_k)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T in float32, (N, E). bf16 x and W on CUDA: one bf16 tensor-core GEMM with float32
        output (torch.mm's out_dtype): each product of two bf16 values is exact in float32 and the sums
        are float32, as in the float32 GEMM of both upcast (transformers' router), which on GPUs runs on
        CUDA cores (2.7 ms of a 16,384-token slice prefill on an H200, for two MoE layers; 0.2 ms this way
        on an H100). The tensor cores' float32 accumulation rounds more coarsely: on an H100, 3.1e-5 off
        the exact logits (up to 7.5) where the float32 GEMM is 1.7e-6 off (tests/unit/test_fused.py), far
        below the bf16 rounding of x itself. Builds without that overload take the float32 GEMM."""
        if x.is_cuda and x.dtype == self.weight.dtype == torch.bfloat16 and _MM_OUT_DTYPE[0]:
            try:
                return torch.mm(x, self.weight.T, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, TypeError):
                _MM_OUT_DTYPE[0] = False
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim) -> weights (N, top_k) float32, expert ids (N, top_k) int64."""
        logits = self.logits(x)  # (N, E)
        if self.fused:  # decided by spmd.model.transformer.use_fused
            return fused.route(logits, self.e_score_correction_bias, self.n_groups, self.topk_groups, self.top_k,
                               self.route_scale)  # one kernel for the ~18 below
        scores = logits.sigmoid()
        choice = (scores + self.e_score_correction_bias).view(x.shape[0], self.n_groups, scores.shape[1] // self.n_groups)  # (N, groups, E/groups)
        group_score = choice.topk(2, dim=-1).values.sum(-1)  # (N, groups)
        kept = group_score.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept, False)
        choice = choice.masked_fill(dropped[..., None], float("-inf")).flatten(1)  # (N, E)
        ids = choice.topk(self.top_k, dim=-1).indices  # (N, top_k)
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.route_scale
        return weights, ids


def _grouped_mm_works(w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for this device, dtype and our layout, without a host sync.

    On CUDA only bf16: torch 2.11 runs fp32 through a fallback that copies the offsets to the host,
    which a CUDA graph cannot capture (seen on H200: "Cannot copy between CPU and CUDA tensors during
    CUDA graph capture"); fp32 there takes the per-expert loop, and decode stays eager."""
    if not hasattr(torch, "_grouped_mm") or (w.device.type == "cuda" and w.dtype != torch.bfloat16):
        return False
    b = torch.ones(2, 16, 32, dtype=w.dtype, device=w.device).transpose(1, 2)  # (G, K, N) column-major
    a = torch.ones(5, 32, dtype=w.dtype, device=w.device)
    try:
        out = torch._grouped_mm(a, b, offs=torch.tensor([2, 5], dtype=torch.int32, device=w.device))
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 32).all())


class MoE(nn.Module):
    """Routed experts (this rank's range) + shared expert (column/row split), summed by one all-reduce; or,
    given an expert-parallel group `ep` (the dpa layout: tp is then one device), routed experts split over
    ep and reached by all-to-all (spmd.parallel.ep), the shared expert whole on every rank."""

    timers = UNTIMED  # attach_timers

    def __init__(self, layer: int, m: ModelArgs, tp: Group, dtype=None, device=None, ep: Group | None = None):
        super().__init__()
        split = ep if ep is not None else tp
        owned = local_slice(m.n_routed_experts, split.rank, split.size)
        self.tp, self.ep, self.layer = tp, ep, layer
        self.fused = self.fused_ok = False  # silu * up in Triton (spmd.model.transformer.use_fused, fused_for)
        self.n_experts, self.expert_lo, self.expert_hi = m.n_routed_experts, owned.start, owned.stop
        self.gate = Gate(m, dtype, device)
        self.shared_experts = MLP(m.dim, m.moe_inter_dim * m.n_shared_experts, tp, "moe.shared",
                                  layer, dtype, reduce_output=False, device=device)
        # keyed by the GLOBAL expert index, so parameter names match the checkpoint's
        self.experts = nn.ModuleDict({str(e): Expert(m.dim, m.moe_inter_dim, dtype, device)
                                      for e in range(owned.start, owned.stop)})

    def fused_fits(self) -> bool:
        return True

    def _a8(self, n: int, dtype: torch.dtype) -> bool:
        """Whether the routed experts run FP8 x FP8 for n tokens (rows per local expert expected: n * k / E)."""
        if getattr(self, "s13", None) is None:
            return False
        from spmd.kernels.fp8 import w8a8_grouped
        e_l = self.w13.shape[0]
        return w8a8_grouped(n * self.gate.top_k * e_l // self.n_experts, e_l, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        with self.timers.compute("moe.gate", layer=self.layer):
            weights, ids = self.gate(x)  # (N, top_k)
        if self.ep is not None:
            return self._forward_ep(x, weights, ids).view(shape)
        from spmd.kernels.fp8 import MODE, Quantized, quantize_act
        xq = None
        if MODE.fused_quant and self.shared_experts.a8_input(x.shape[0], x.dtype) and self._a8(x.shape[0], x.dtype):
            # the shared and the routed experts both run FP8 x FP8 on x: one quantization for both
            xq = Quantized(*quantize_act(x, pad4=True), x.shape, x.dtype, x)
        with self.timers.compute("moe.experts", layer=self.layer):
            y = self.routed(x, weights, ids, xq)  # (N, dim), partial: this rank's experts only
        with self.timers.compute("moe.shared", layer=self.layer):
            y += self.shared_experts(x if xq is None else xq)  # partial: this rank's columns of the shared expert
        return self.tp.all_reduce("moe.combine", y, self.layer).view(shape)

    def _forward_ep(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The dpa layout: this rank's tokens to the experts' ranks and back, plus the shared expert."""
        got = dispatch(self.ep, x, weights, ids, self.expert_hi - self.expert_lo, self.layer)
        with self.timers.compute("moe.experts", layer=self.layer):
            y = self.routed(got.x, got.weights, got.ids)  # (M, dim): sums over this rank's experts
        y = combine(self.ep, y, got, self.layer)  # (N, dim)
        with self.timers.compute("moe.shared", layer=self.layer):
            return y + self.shared_experts(x)

    def pack(self) -> None:
        """Stack the local experts into (E_l, 2I, dim) and (E_l, dim, I) for grouped GEMMs; experts become views.

        Kept FP8 experts (with their block scales stacked alike) need the Triton grouped kernel and I a
        multiple of 128 (gate and up blocks must not share a scale row); otherwise they are dequantized here.
        """
        ex = [self.experts[str(e)] for e in range(self.expert_lo, self.expert_hi)]
        if not ex:
            return
        w = ex[0].gate_proj.weight
        inter = w.shape[0]
        if w.dtype == torch.float8_e4m3fn:
            from spmd.kernels.fp8 import dequantize, triton_available
            if inter % 128 == 0 and triton_available(w.device):
                self._stack(ex, inter, scales=True)
                return
            for e in ex:  # no FP8 kernel for this layout: compute dtype, like a dequantizing load
                for lin in (e.gate_proj, e.up_proj, e.down_proj):
                    lin.weight.data = dequantize(lin.weight, lin.weight_scale_inv, self.gate.weight.dtype)
                    del lin.weight_scale_inv
            w = ex[0].gate_proj.weight
        if hasattr(torch, "_grouped_mm") and _grouped_mm_works(w):
            self._stack(ex, inter, scales=False)

    def _stack(self, ex: list, inter: int, scales: bool) -> None:
        self.w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ex])
        self.w2 = torch.stack([e.down_proj.weight for e in ex])
        for i, e in enumerate(ex):  # the per-expert parameters (checkpoint names) now alias the stacks
            e.gate_proj.weight.data, e.up_proj.weight.data = self.w13[i, :inter], self.w13[i, inter:]
            e.down_proj.weight.data = self.w2[i]
        if scales:
            self.s13 = torch.stack([torch.cat([e.gate_proj.weight_scale_inv, e.up_proj.weight_scale_inv]) for e in ex])
            self.s2 = torch.stack([e.down_proj.weight_scale_inv for e in ex])
            for i, e in enumerate(ex):
                e.gate_proj.weight_scale_inv = self.s13[i, :inter // 128]
                e.up_proj.weight_scale_inv = self.s13[i, inter // 128:]
                e.down_proj.weight_scale_inv = self.s2[i]

    def _gmm(self, x: torch.Tensor, w: torch.Tensor, scale, offs: torch.Tensor, row_expert,
             rows: torch.Tensor | None = None, a8: bool = False, xq=None, dtype=None) -> torch.Tensor:
        """Grouped x[rows] @ w[e]^T over the rows of each local expert (offs: their end rows; row_expert:
        each row's local expert, E_l past them). a8 (kept FP8 weights, spmd.kernels.fp8.w8a8_grouped):
        x is quantized per row and 128 columns first (before the gather: N tokens, not N * top_k slots)
        and the GEMM runs FP8 x FP8; xq: x already quantized, (q, scales), x None and dtype the output's."""
        if a8:
            from spmd.kernels.fp8 import fp8_grouped_mm, gather_rows, quantize_act
            q, qs = quantize_act(x) if xq is None else xq
            if rows is not None:
                q, qs = gather_rows(q, qs, rows)
            return fp8_grouped_mm(q, w, scale, offs, row_expert, x_scale=qs, out_dtype=dtype or x.dtype)
        if rows is not None:
            x = x[rows]
        if scale is not None:
            from spmd.kernels.fp8 import fp8_grouped_mm
            return fp8_grouped_mm(x, w, scale, offs, row_expert)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, xq=None) -> torch.Tensor:
        """Sum over this rank's experts of weight * expert(token), for the tokens routed to each; (N, dim).
        xq: x already quantized (a spmd.kernels.fp8.Quantized), taken where the experts run FP8 x FP8."""
        grouped = getattr(self, "w13", None) is not None
        return self._routed_grouped(x, weights, ids, xq) if grouped else self._routed_loop(x, weights, ids)

    def _routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, xq=None) -> torch.Tensor:
        """Grouped GEMMs over (token, expert) slots sorted by local expert; no host sync, no Python loop."""
        n, k = ids.shape
        flat = ids.flatten()  # (N*k,)
        local = (flat >= self.expert_lo) & (flat < self.expert_hi)
        key = torch.where(local, flat - self.expert_lo, self.w13.shape[0])  # other ranks' slots sort last
        row_expert, order = key.sort(stable=True)  # (N*k,) slots grouped by local expert
        counts = torch.zeros(self.w13.shape[0] + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, key, torch.ones_like(key))  # fixed size: bincount would sync to size its output
        offs = counts[:-1].cumsum(0).to(torch.int32)  # (E_l,) end row of each local expert
        s13, s2 = getattr(self, "s13", None), getattr(self, "s2", None)
        a8 = self._a8(n, x.dtype)  # prefill-sized: FP8 x FP8
        # (N*k, 2I) over the slots in expert order; rows past offs[-1] belong to no group and are not computed
        gate_up = self._gmm(x, self.w13, s13, offs, row_expert, rows=order // k, a8=a8,
                            xq=None if xq is None or not a8 else (xq.q, xq.s))  # (N*k, 2I)
        # the routing weight scales the I-wide intermediate in the activation dtype (linear: down(w a) =
        # w down(a)): no float32 copy of the dim-wide output (issue 26: 28 GiB at 32 x 4096 tokens)
        w = torch.where(local, weights.flatten(), 0.0)[order]  # (N*k,) float32; other ranks' slots 0
        xq, dtype = None, gate_up.dtype
        if fused.fused_for(self, n) and gate_up.dtype in (torch.bfloat16, torch.float16):
            # one kernel: silu(gate) * up * w, quantized for the FP8 x FP8 down projection where it runs one
            from spmd.kernels.fp8 import MODE
            if a8:
                act, xq = None, fused.silu_mul(gate_up, w, quant=True, ue8m0=MODE.ue8m0)
            else:
                act = fused.silu_mul(gate_up, w)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up  # (N*k, I)
            del gate, up
            act.mul_(w.to(act.dtype)[:, None])
        del gate_up
        h = self._gmm(act, self.w2, s2, offs, row_expert, a8=a8, xq=xq, dtype=dtype)  # (N*k, dim)
        if self.expert_lo > 0 or self.expert_hi < self.n_experts:  # some slots are other ranks' experts:
            h.masked_fill_(~local[order, None], 0.0)  # their rows (past offs[-1]) are not computed
        # back to slot order (slot order[i] is row i) by a gather, then each token's k slots summed in order
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        if fused.fused_for(self, n) and h.dtype in (torch.bfloat16, torch.float16):
            return fused.gather_sum(h, inv, k)  # one kernel, no (N*k, dim) copy
        return h.index_select(0, inv).view(n, k, h.shape[-1]).sum(1)

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
