"""spmd.plan: memory per GPU of tp and dpa layouts (by hand on the tiny config, the real config's verdicts),
the FP8 block rule, where routed tokens go, the dpa performance model, the CLI and the pre-load check."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from conftest import ROOT
from spmd.config import ModelArgs
from spmd.config.sizes import layer_params
from spmd.plan import memory, perf
from spmd.plan.__main__ import main
from spmd.plan.layouts import Layout, candidates, unaligned
from spmd.plan.routing import destinations, sample_routes

TINY = ModelArgs.from_config(json.loads((ROOT / "inputs/models/tiny.json").read_text()))
FULL = ModelArgs.from_config(json.loads((ROOT / "inputs/models/v3.1-671b.json").read_text()))
GIB = 2.0**30
ROUTES = sample_routes(FULL)


def test_tiny_memory_by_hand():
    """tiny: dim 256, 4 layers (1 dense), 8 heads, 16 experts (+2 shared), vocab 4096, all bf16 (2 bytes)."""
    q_a, q_b, kv_a = 256 * 128, 128 * 8 * (64 + 64), 256 * (128 + 64)
    kv_b, o = 128 * 8 * (64 + 64), 8 * 64 * 256
    dense, shared, gate, experts = 3 * 256 * 512, 3 * 256 * 256 * 2, 16 * 256, 16 * 3 * 256 * 256
    vocab = 4096 * 256  # embedding and lm_head each
    attn = 4 * (q_a + q_b + kv_a + kv_b + o)
    tp = 2 * (4 * (q_a + kv_a) + 3 * gate + 4 * (q_b + kv_b + o) / 2 + dense / 2 + 3 * shared / 2
              + 3 * experts / 2 + 2 * vocab / 2)
    dpa = 2 * (attn + dense + 3 * (shared + gate) + 3 * experts / 2 + 2 * vocab)
    rows, context = 8, 100
    cache = rows * context * (128 + 64) * 2 * 4  # all 8 rows on every tp rank, 4 layers
    got_tp = memory.per_gpu(TINY, Layout(2), rows, context, "bf16")
    got_dpa = memory.per_gpu(TINY, Layout(2, family="dpa"), rows, context, "bf16")
    assert got_tp.weights_gib * GIB == pytest.approx(tp) and got_dpa.weights_gib * GIB == pytest.approx(dpa)
    assert got_tp.cache_gib * GIB == pytest.approx(cache) and got_dpa.cache_gib * GIB == pytest.approx(cache / 2)
    assert got_dpa.weights_gib >= got_tp.weights_gib and (got_tp.rows, got_dpa.rows) == (8, 4)
    # workspace: the fixed allowance + 8 float32 vocab-wide logit buffers per row the GPU holds
    assert got_tp.workspace_gib * GIB == pytest.approx(memory.WORKSPACE_GIB * GIB + 8 * 8 * 4096 * 4)


def test_layer_tensors_add_up_to_layer_params():
    for m in (TINY, FULL):
        for i in range(m.n_layers):
            t, p = memory.layer_tensors(m, i), layer_params(m, i)
            assert sum(v for k, v in t.items() if k != "routed_experts") == p.replicated + p.sharded
            assert t.get("routed_experts", 0) == m.n_routed_experts * p.expert


def test_real_config_verdicts():
    """FP8, 256 rows x 4096 tokens, 0.9 of the GPU usable. A token's cache is 576 values x 2 bytes x 61
    layers = 70,272 bytes; a row of 4096 tokens 0.268 GiB. dpa G32: attention (q_a 11.0M + q_b 37.7M + kv_a
    4.1M + o_proj 117.4M params at ~1 byte, kv_b 16.8M at 2) 12.4 GB over 61 layers + dense MLP 1.2 GB +
    shared experts 2.6 GB + gate 0.2 GB + embedding and head 3.7 GB (bf16) + 256/32 experts x 58 layers x
    44.0M = 20.4 GB: 40.5 GB = 37.8 GiB; cache 8 rows = 2.1 GiB; 41.9 GiB in all <= 72 (80 GB GPU).
    G64: 28.2 + 1.1 + 2.0 = 31.3. tp G16 holds all 256 rows: 40.2 + 68.6 + 3.0 = 111.8 GiB > 57.6 (64 GB
    GPU), and with 32 rows 40.2 + 8.6 + 2.1 = 50.9 fits; dpa G16 = 56.8 + 4.3 + 2.1 = 63.1 > 57.6."""
    def total(family, g, rows=256):
        return memory.per_gpu(FULL, Layout(g, family=family), rows, 4096, "fp8").total_gib

    assert total("dpa", 32) == pytest.approx(41.9, abs=0.1) and total("dpa", 64) == pytest.approx(31.3, abs=0.1)
    assert total("dpa", 32) <= 0.9 * 80 and total("dpa", 64) <= 0.9 * 80 and total("dpa", 16) <= 0.9 * 80
    assert total("dpa", 8) > 0.9 * 80  # 94.9 GiB of weights alone
    assert total("tp", 16) == pytest.approx(111.8, abs=0.1) and total("tp", 16) > 0.9 * 64
    assert total("tp", 16, rows=32) == pytest.approx(50.9, abs=0.1) and total("tp", 16, rows=32) <= 0.9 * 64
    assert 0.9 * 64 < total("dpa", 16) == pytest.approx(63.1, abs=0.1)
    cache = memory.per_gpu(FULL, Layout(16), 256, 4096, "fp8").cache_gib
    assert cache == pytest.approx(256 * 4096 * 576 * 2 * 61 / GIB)
    assert memory.per_gpu(FULL, Layout(16, family="dpa"), 256, 4096, "fp8").cache_gib == pytest.approx(cache / 16)


def test_fp8_blocks_of_tp_groups(monkeypatch):
    """tp shards of FP8 tensors must fall on 128-row blocks: at G = 16 all do; at G = 32 the dense MLP
    (18432 / 32 = 576 rows) and the shared expert (2048 / 32 = 64) do not and are held in bf16."""
    assert unaligned(FULL, 16) == () and unaligned(FULL, 8) == ()
    assert unaligned(FULL, 32) == ("dense_mlp", "shared_expert")
    g32 = memory.per_gpu(FULL, Layout(32), 1, 4096, "fp8")
    assert g32.dequantized == ("dense_mlp", "shared_expert")
    # the two in bf16 instead of FP8: (3 dense x 396.4M + 58 shared x 44.0M) / 32 x ~1 extra byte = 0.20 GB
    extra = (3 * 3 * 7168 * 18432 + 58 * 3 * 7168 * 2048) / 32 * (2 - memory.WEIGHT_BYTES["fp8"])
    monkeypatch.setattr(memory, "unaligned", lambda m, g: ())
    kept = memory.per_gpu(FULL, Layout(32), 1, 4096, "fp8")
    monkeypatch.undo()
    assert (g32.weights_gib - kept.weights_gib) * GIB == pytest.approx(extra)
    # dpa keeps the embedding and the head whole (bf16): zero layers on a first-and-last stage are those two
    assert memory.weight_bytes(FULL, Layout(32, family="dpa"), range(0), True, True, "fp8") == \
        2 * 2 * FULL.vocab_size * FULL.dim
    msg = memory.check(FULL, "tp", 32, 1, 80, "fp8", 256, 4096)
    assert msg and "dense_mlp, shared_expert dequantized to bf16" in msg
    assert memory.check(FULL, "tp", 24, 1, 141, "fp8", 1, 4096) == \
        "tp layout: n_heads=128 not divisible by group size 24"


def test_destinations():
    one = destinations(FULL, 1, 8, ROUTES)
    assert (one.ranks, one.nodes, one.cross, one.intra, one.local) == (1.0, 1.0, 0.0, 0.0, 1.0)
    # G = 8: a rank per expert group; a token keeps 4 groups, so at most 4 ranks
    assert destinations(FULL, 8, 8, ROUTES).ranks <= 4 and destinations(FULL, 8, 8, ROUTES).cross == 0
    # 4 GPUs per node and G = 32 (or 8 per node and G = 64): one expert group per node, at most 4 nodes
    assert destinations(FULL, 32, 4, ROUTES).max_nodes == 4 and destinations(FULL, 64, 8, ROUTES).max_nodes == 4
    assert destinations(FULL, 64, 4, ROUTES).max_nodes > 4  # two nodes per group: more
    ranks = [destinations(FULL, g, 8, ROUTES).ranks for g in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert ranks == sorted(ranks) and ranks[-1] == 8.0  # one expert per rank: all 8 distinct
    d = destinations(FULL, 32, 4, ROUTES)
    assert d.local + d.intra + d.cross == pytest.approx(d.ranks)
    assert d.cross == pytest.approx(d.ranks * 28 / 32) and d.intra == pytest.approx(d.ranks * 3 / 32)


def test_dpa_step():
    fit, gpu = perf.FITS["fp8"], perf.Gpu("x", 3000.0, 80.0)
    intra, inter = perf.links(4)
    tp1 = perf.step_s(FULL, Layout(1), 64, fit, gpu, intra, inter, 4, 4096)
    dpa1 = perf.step_s(FULL, Layout(1, family="dpa"), 64, fit, gpu, intra, inter, 4, 4096)
    assert dpa1["step_s"] == pytest.approx(tp1["step_s"]) and dpa1["alltoall_s"] == 0  # one GPU: the same
    dest = destinations(FULL, 32, 4, ROUTES)
    p = perf.step_s(FULL, Layout(32, family="dpa"), 256, fit, gpu, intra, inter, 4, 4096, dest=dest)
    assert p["allreduce_s"] == 0 and p["alltoall_s"] > 0
    hidden, mine = 7168 * 2, 256 // 32
    assert p["dispatch_cross_B"] == pytest.approx(mine * dest.cross * (hidden + 8 * 8))
    assert p["combine_intra_B"] == pytest.approx(mine * dest.intra * hidden)
    per_layer = (perf.alltoall_s(p["dispatch_intra_B"], p["dispatch_cross_B"], intra, inter)
                 + perf.alltoall_s(p["combine_intra_B"], p["combine_cross_B"], intra, inter))
    assert p["alltoall_s"] == pytest.approx(58 * per_layer)  # the 58 MoE layers
    slower = perf.step_s(FULL, Layout(32, family="dpa"), 256, fit, gpu, intra, perf.links(4, 10.0)[1], 4, 4096,
                         dest=dest)
    assert slower["alltoall_s"] > p["alltoall_s"]


def test_tp_bytes_are_the_floors():
    from traces.floor import layer_bytes as floor_layer_bytes

    for i in (0, 5):
        for g, w in ((1, "bf16"), (8, "fp8")):
            assert perf.layer_bytes(FULL, i, 32, 1000, g, w) == floor_layer_bytes(FULL, i, 32, 1000, g, w)
    plain = perf.layer_bytes(FULL, 0, 32, 0, 32, "fp8")
    assert perf.layer_bytes(FULL, 0, 32, 0, 32, "fp8", dequant=("dense_mlp",)) == pytest.approx(
        plain + (2 - memory.WEIGHT_BYTES["fp8"]) * 3 * 7168 * 18432 / 32)


def test_constants_match_the_stored_model():
    stored = json.loads((ROOT / "traces/results/model/model-NVIDIA_H200.json").read_text())
    fits = {(f["mode"], f["weights"]): f for f in stored["fits"]}
    for w, fit in perf.FITS.items():
        assert fit.c_layer_s == pytest.approx(fits["graph", w]["c_layer_s"], rel=1e-3)
        assert fit.eta == pytest.approx(fits["graph", w]["eta"], rel=1e-3)
    assert perf.H200_COPY_GBPS == pytest.approx(stored["copy_gbps"], rel=1e-3)
    assert perf.INTRA_ALPHA_S == pytest.approx(stored["intra"]["alpha_s"], rel=1e-3)
    from spmd.engines.memory import DECODE_LOGIT_COPIES

    assert memory.LOGIT_COPIES == DECODE_LOGIT_COPIES


def test_candidates():
    lays = candidates(FULL, 16, 4, 256)
    assert Layout(16, family="dpa") in lays and Layout(16) in lays and Layout(4, 4, 4, 1) in lays
    assert Layout(4, 4, 4, 1, "dpa") not in lays  # modelled, not built: the program runs dpa with one stage
    assert all(lay.gpus == 16 for lay in lays)
    assert Layout(8, 2, 2, 1) not in lays  # a stage of 8 ranks would span two 4-GPU nodes
    assert not any(lay.family == "dpa" and lay.group == 1 for lay in lays)  # that is tp G1


def test_check():
    assert memory.check(FULL, "dpa", 32, 1, 80, "fp8", 256, 4096) is None
    msg = memory.check(FULL, "tp", 8, 1, 80, "fp8", 256, 4096, gpus_per_node=4)
    assert msg.startswith("layout tp G=8 P=1 does not fit: per GPU weights 79.4 GiB (fp8) + latent cache 68.6 GiB "
                          "(256 rows x 4096 tokens) + workspace 3.0 GiB = 151.0 GiB > 0.9 x 80 GiB = 72.0 GiB")
    assert "smallest that fits" in msg and "--group-layout" in msg
    assert memory.check(FULL, "ep", 8, 1, 80, "fp8", 1, 1) == "group layout 'ep' is not one of tp, dpa"


def test_cli_prints_a_recommendation():
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--config", str(ROOT / "inputs/models/v3.1-671b.json"), "--gpu-mem", "80",
                     "--gpus-per-node", "4", "--nodes", "1-4"]) == 0
    text = out.getvalue()
    assert "Recommendation" in text and "dpaG16 on 4 node(s)" in text
    out = io.StringIO()
    with redirect_stdout(out):
        main(["--config", str(ROOT / "inputs/models/v3.1-671b.json"), "--gpu-mem", "80", "--gpus-per-node", "4",
              "--nodes", "4", "--json"])
    doc = json.loads(out.getvalue())
    assert doc["recommendation"]["layout"] == "dpaG16" and all(r["fits"] for r in doc["rows"])


def test_cli_is_light():
    """No torch, numpy, mpi4py or traces: it runs on a login node."""
    code = ("import sys; from spmd.plan.__main__ import main; main(['--config', 'inputs/models/v3.1-671b.json', "
            "'--gpu-mem', '64', '--gpus-per-node', '4']); "
            "print(sorted(m for m in ('torch', 'numpy', 'mpi4py', 'traces') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]" and "Recommendation" in out.stdout


def test_stored_model_projects_both_layouts():
    """make model's file (traces/results/model/, regenerated and compared by test_perf_model) carries both
    families for 1-8 nodes of 4 and of 8 GPUs; a dpa group spanning nodes sends bytes off the node."""
    rows = json.loads((ROOT / "traces/results/model/model-NVIDIA_H200.json").read_text())["layouts"]
    keys = {(r["gpu"], r["gpus_per_node"], r["nodes"], r["family"]) for r in rows}
    assert keys == {(g, n, k, f) for g in ("H200", "H100") for n in (4, 8) for k in (1, 2, 3, 4, 6, 8)
                    for f in ("tp", "dpa")}
    wide = [r for r in rows if r["fits"] and r["family"] == "dpa" and r["G"] > r["gpus_per_node"]]
    assert wide and all(r["dispatch_cross_mb_per_node"] > 0 and r["allreduce_ms"] == 0 for r in wide)
    assert all(r["alltoall_ms"] == 0 for r in rows if r["fits"] and r["family"] == "tp")


def test_the_program_checks_its_layout_before_loading():
    """spmd.engines.memory.layout_check (run.check_fits calls it on each CUDA rank before the load): the
    planner's message for a layout that cannot fit, None for one that fits or for fp32 (not counted)."""
    from types import SimpleNamespace

    from spmd.engines.memory import layout_check

    def args(layout, g, **kw):
        return SimpleNamespace(**{**dict(dtype="bf16", group_size=g, group_layout=layout, slots=0, pp=1,
                                         max_context=0, gpu_memory_fraction=0.9), **kw})

    assert layout_check(args("dpa", 32), FULL, 80, 4, fp8_kept=True) is None
    msg = layout_check(args("tp", 8), FULL, 80, 4, fp8_kept=True)
    assert msg.startswith("layout tp G=8 P=1 does not fit: per GPU weights") and "smallest that fits" in msg
    assert layout_check(args("tp", 8, dtype="fp32"), FULL, 80, 4, fp8_kept=True) is None
    assert layout_check(args("tp", 16), FULL, 80, 4, fp8_kept=False) is not None  # bf16 weights: 1.3 TB / 16
