"""The native engine's decode slots for continuous batching: one latent-cache row per slot, decode over all.

Layout: one cache of (n_slots, max_len) columns per layer; slot s's request lives in row s, its token j in
column j (no padding: a request's position is its column). Why per-slot rows and not pages: attention
stays one batched matmul over a row-strided view of the cache, every address is static (what a CUDA
graph replays) and nothing needs a block table; the price is that each slot reserves `max_len` columns,
so one long request in a prompt set makes every slot long (a paged cache would give short requests
short rows). `max_len` is the longest prompt + its max new tokens, so the planner (spmd.engines.memory)
can size the slot count to it.

A decode step feeds one token per slot of the first R slots (R: the highest slot in use, rounded up to
a power of two, at least 8) and attends over the first S columns (S: the longest row in use + 1, rounded
up to a power of two, at least 128): one static shape, and in "graph" mode one captured graph, per (R, S).
Every row writes its token at its own next free column (`lens`): for a decoding row that is its next
token; a free row or one still being prefilled writes a column that its next prefill overwrites, and its
logits are ignored.

Prefill: new requests' prompts (or the first piece of a longer one) go through one forward as a
left-padded batch with a throw-away cache, and each row's real columns are copied into its slot's row;
a later piece of a long prompt runs alone on a view of its slot's row, at its offset (MLA "naive").
"""
from __future__ import annotations

import torch

from collections import Counter

from spmd.model.transformer import Cache

MIN_ROWS, MIN_COLS = 8, 128


def bucket(n: int, least: int, most: int) -> int:
    """n rounded up to a power of two, at least `least`, at most `most`."""
    b = least
    while b < n:
        b *= 2
    return min(b, most)


class SlotCache:
    """The slots' latent cache and the decode step's static buffers (graphs per (rows, columns) shape)."""

    def __init__(self, model, n_slots: int, max_len: int, device, mode: str, timers, pool=None):
        self.model, self.n_slots, self.max_len, self.mode, self.timers = model, n_slots, max_len, mode, timers
        self.device = torch.device(device)
        self.cache = model.new_cache(n_slots, max_len)
        self.tokens = torch.zeros(n_slots, 1, dtype=torch.long, device=self.device)
        self.lens = torch.zeros(n_slots, dtype=torch.long, device=self.device)  # each row's next free column
        self.pool = pool
        self.graphs: dict[tuple[int, int], tuple] = {}  # (R, S) -> (graph, logits)
        self.shapes: Counter = Counter()  # decode steps per (R, S): the run summary's decode_shapes
        self.last = ""  # the last step's shape, "RxS"
        self.gpu: dict[tuple[int, int], list] = {}  # (R, S) -> [steps, ms]: GPU time of replayed steps
        self._events: list[tuple[tuple[int, int], object, object]] = []  # pending (shape, start, end) pairs

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.cache.kv, *self.cache.pe])

    def view(self, rows: slice, cols: int) -> Cache:
        """The cache of some rows, first `cols` columns (views: writes land in the slots' rows)."""
        return Cache([kv[rows, :cols] for kv in self.cache.kv], [pe[rows, :cols] for pe in self.cache.pe])

    def shape(self, used_rows: int, longest: int) -> tuple[int, int]:
        """(R, S) of a decode step: rows 0..used_rows-1 in use, the longest row `longest` columns after it."""
        if self.mode == "eager":
            return used_rows, longest
        return bucket(used_rows, MIN_ROWS, self.n_slots), bucket(longest, MIN_COLS, self.max_len)

    def rows_for(self, used: int) -> int:
        """The rows a decode step of slots 0..used-1 runs (R of `shape`)."""
        return self.shape(used, 1)[0]

    def move(self, src: int, dst: int, cols: int) -> None:
        """Copy a slot's first `cols` columns into another slot's row (compaction: spmd.runtime.scheduler)."""
        for t in [*self.cache.kv, *self.cache.pe]:
            if t.shape[1]:
                t[dst, :cols] = t[src, :cols]

    def decode(self, tokens: list[int], lens: list[int], forward) -> torch.Tensor:
        """tokens[r], lens[r] for rows 0..R-1 in use → (R', V) logits (R' >= R rows; use the first R).

        forward(tokens, positions, cache, start) runs the model (or the pipeline) on the step."""
        used = len(tokens)
        rows, cols = self.shape(used, max(lens) + 1)
        self.shapes[(rows, cols)] += 1
        self.last = f"{rows}x{cols}"
        host = torch.zeros(2, rows, dtype=torch.long)
        host[0, :used], host[1, :used] = torch.tensor(tokens), torch.tensor(lens)
        self.tokens[:rows, 0].copy_(host[0], non_blocking=True)
        self.lens[:rows].copy_(host[1], non_blocking=True)
        if self.mode != "graph":
            return self._step(rows, cols, forward)
        if (rows, cols) not in self.graphs:
            self._capture(rows, cols, forward)
        graph, logits = self.graphs[(rows, cols)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with self.timers.compute("decode.graph"):
            start.record()
            graph.replay()
            end.record()
        self._events.append(((rows, cols), start, end))
        if len(self._events) >= 1024:  # steps long done: resolving them waits for nothing
            self._resolve(self._events[:512])
            del self._events[:512]
        return logits

    def _resolve(self, pairs) -> None:
        for key, start, end in pairs:
            end.synchronize()
            got = self.gpu.setdefault(key, [0, 0.0])
            got[0] += 1
            got[1] += start.elapsed_time(end)

    def gpu_ms(self) -> dict[str, float]:
        """Mean GPU time (ms) of a replayed decode step per shape "RxS" (graph mode; {} otherwise): what the
        device spent, against which the loop's wall time per step shows what the host adds."""
        self._resolve(self._events)
        self._events.clear()
        return {f"{r}x{c}": round(ms / n, 3) for (r, c), (n, ms) in sorted(self.gpu.items())}

    def _step(self, rows: int, cols: int, forward) -> torch.Tensor:
        lens = self.lens[:rows]
        return forward(self.tokens[:rows], lens[:, None], self.view(slice(0, rows), cols), lens)

    def _capture(self, rows: int, cols: int, forward) -> None:
        """Two warm-up steps on a side stream (cuBLAS, Triton, NCCL set up outside capture), then capture.
        Warm-up and capture write the same columns with the same values as the replay that follows."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with self.timers.suspended(), torch.cuda.stream(side):
            for _ in range(2):
                self._step(rows, cols, forward)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with self.timers.suspended(), torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(rows, cols, forward)
        self.graphs[(rows, cols)] = (graph, logits)

    def take_prefill(self, slots: list[int], lengths: list[int], pad_cache: Cache, width: int) -> None:
        """Copy each prefilled row's real columns (the last lengths[i] of `width`, left padding) from the
        throw-away cache into its slot's row, columns 0..lengths[i]-1."""
        for i, (slot, n) in enumerate(zip(slots, lengths)):
            for dst, src in zip([*self.cache.kv, *self.cache.pe], [*pad_cache.kv, *pad_cache.pe]):
                if dst.shape[1]:  # layers of this pipeline stage
                    dst[slot, :n] = src[i, width - n:]

    def close(self) -> None:
        """Destroy the captured graphs (before the process groups go: see GraphDecoder.close)."""
        if self.graphs:
            torch.cuda.synchronize(self.device)
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
