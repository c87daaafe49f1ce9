"""Static-shape decode steps, replayed from captured CUDA graphs.

A decode step of a batch of B rows is one forward of B tokens against the latent cache. Launched op by
op from Python, a step costs ~10 µs of host time per kernel, which at small batches is longer than the
GPU work itself (the slice at batch 1: ~2 ms of weight reads behind ~11 ms of launches). A CUDA graph
replays the whole step, collectives included, with one launch.

What a graph needs, and how the model gives it (`Transformer.forward` with a tensor `start`): every
input lives in a static buffer (`StaticDecode`: token ids, positions, key mask, the cache slot as a
(1,) device tensor, the cache itself), the cache is written with `index_copy_` at that slot and
attention runs over every slot of the cache, the unwritten ones masked by the key mask, so no shape
depends on the step and nothing is read back to the host. The MoE must run its grouped path (the
per-expert loop reads counts back). One `StaticDecode` per (batch, cache length rounded up to a
multiple of `ROUND`), kept for later batches of the same shape; the graph is captured at the first
step (two warm-up forwards on a side stream first: cuBLAS, Triton and NCCL set up outside capture);
all graphs share one memory pool.

Timing: by default a replayed step is one compute event `decode.graph`. With SPMD_GRAPH_MARKS=stamp
(or event) and the timers on, a shape gets a graph captured inside `Timers.capturing()`, so each
per-layer and per-collective span of the eager step is timed by marks that the graph records itself
(spmd/obs/graph_marks.py); the timers resolve one step's marks on the host after the next step's launch,
while the GPU runs it (no host sync added, no timer work before a launch). Event marks are overwritten
by the launch, so with them a shape gets two graphs that take turns. With the timers off, one graph
without marks. Warm-up and capture run with the timers suspended (nothing they do is a step).
mode "static" runs the same static-shape forward eagerly, on any device: what CPU
tests check.
"""
from __future__ import annotations

import torch

from spmd.obs.graph_marks import marks_level, marks_mode

ROUND = 64  # cache lengths are rounded up to this, so similar batches reuse one graph


class StaticDecode:
    """The static buffers of one (batch, cache length) shape, and its graph once captured."""

    def __init__(self, model, bsz: int, max_len: int, device):
        self.cache = model.new_cache(bsz, max_len)
        self.key_mask = torch.zeros(bsz, max_len, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        # timed? -> [(graph, logits buffer, GraphTiming)]: two graphs taking turns with event marks, else one
        self.graphs: dict[bool, list[tuple]] = {}
        self.turn = 0

    def forward(self, model) -> torch.Tensor:
        return model(self.tokens, self.pos, self.key_mask, self.cache, start=self.slot)


class GraphDecoder:
    """Static buffers per shape; `step` feeds one decode step and runs it (replayed in "graph" mode)."""

    def __init__(self, model, timers, device, mode: str):
        if mode not in ("static", "graph"):
            raise ValueError(f"mode={mode!r}, expected 'static' or 'graph'")
        if mode == "graph" and torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.timers, self.device, self.mode = model, timers, torch.device(device), mode
        self.states: dict[tuple[int, int], StaticDecode] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "graph" else None
        self.marks = marks_mode() if mode == "graph" else "off"  # checked here: a bad value fails at load
        marks_level()

    def state(self, bsz: int, need_len: int) -> StaticDecode:
        """The buffers for bsz rows and at least need_len cache slots (made on first use)."""
        key = (bsz, -(-need_len // ROUND) * ROUND)
        if key not in self.states:
            self.states[key] = StaticDecode(self.model, bsz, key[1], self.device)
        return self.states[key]

    def step(self, st: StaticDecode, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """(B,) ids written at cache slot `slot` → (B, V) logits (in graph mode a static buffer: valid
        until the next step of this shape)."""
        st.tokens.copy_(tokens[:, None])
        st.key_mask[:, slot] = True
        st.pos.add_(1)
        st.slot.fill_(slot)
        if self.mode == "static":
            return st.forward(self.model)
        timed = self.timers.enabled and self.marks != "off"
        if timed not in st.graphs:
            self._capture(st, timed)
        variants = st.graphs[timed]
        graph, logits, timing = variants[st.turn % len(variants)]
        st.turn += 1
        if not timing:  # no marks in the graph: the step is one event (nothing when the timers are off)
            with self.timers.compute("decode.graph"):
                graph.replay()
            return logits
        self.timers.before_replay(timing)
        graph.replay()
        self.timers.replayed(timing)
        return logits

    def close(self) -> None:
        """Destroy every captured graph and drop the static buffers. Called before the process groups
        are destroyed: NCCL cannot tear down a communicator that a live graph still holds (with a graph
        alive, destroy_process_group hangs in ncclCommDestroy; pytorch/pytorch#115388, seen here on
        2x H200 with NCCL 2.28)."""
        if self.mode == "graph":
            torch.cuda.synchronize(self.device)
        for st in self.states.values():
            for variants in st.graphs.values():
                for graph, _, _ in variants:
                    graph.reset()
            st.graphs.clear()
        self.states.clear()

    def _capture(self, st: StaticDecode, timed: bool) -> None:
        """Warm up on a side stream (first capture of this shape), then capture the forward (twice when
        timed by event marks); the replay after it runs the step itself (warm-up and capture write the same slot of the
        cache with the same values)."""
        current = torch.cuda.current_stream(self.device)
        if not st.graphs:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with self.timers.suspended(), torch.cuda.stream(side):
                for _ in range(2):
                    st.forward(self.model)
            current.wait_stream(side)
        variants = []
        for _ in range(2 if timed and self.marks == "event" else 1):
            graph = torch.cuda.CUDAGraph()
            with self.timers.capturing() as timing, torch.cuda.graph(graph, pool=self.pool):
                logits = st.forward(self.model)
                self.timers.end_capture()
            variants.append((graph, logits, timing))
        st.graphs[timed] = variants
