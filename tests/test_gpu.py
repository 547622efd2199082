"""GPU tests of the fused kernels (real launches, grid barriers, CUDA graphs, torch.compile).

Skipped cleanly without CUDA. Run by ``bench/gpu_check.sh`` on the lent H100/H200.
Every comparison is against the float64 reference on fresh random inputs.

A dry run on a CPU (``SN_FUSED_GPU_DRY_RUN=1`` with ``TRITON_INTERPRET=1``) runs the tests that
need no CUDA of their own (streams, graphs, the profiler, compile, autocast: skipped) through the
interpreter, planned for a 132-SM card (``_INTERPRETER_GRID_CAP``) and run phase by phase, on
weights up to ``SN_FUSED_GPU_DRY_MAX_ELEMENTS`` (default 2**21): the tests' own code, plans and
asserted configs checked before a GPU call spends its minutes on them. Not the single launch's
timing or bits: a GPU's.

    SN_FUSED_GPU_DRY_RUN=1 TRITON_INTERPRET=1 python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

DRY_RUN = os.environ.get("SN_FUSED_GPU_DRY_RUN", "0") == "1"
if DRY_RUN:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the dry run needs TRITON_INTERPRET=1", allow_module_level=True)
elif os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (and TRITON_INTERPRET unset)", allow_module_level=True)

import sn_fused  # noqa: E402
from conftest import cuda_kernel_names, path_taken  # noqa: E402
from sn_fused import reference  # noqa: E402
from sn_fused.ops import new_semaphore, spectral_norm_backward_fused, spectral_norm_forward_fused  # noqa: E402
from sn_fused.ops import spectral_norm as ops_mod  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cpu" if DRY_RUN else "cuda")
#: Tests of CUDA itself: not in a dry run.
cuda_only = pytest.mark.skipif(DRY_RUN, reason="CUDA's own streams, graphs, profiler, compile or autocast")
DRY_MAX_ELEMENTS = int(os.environ.get("SN_FUSED_GPU_DRY_MAX_ELEMENTS", 2**21))


@pytest.fixture(autouse=True)
def _planned_for_the_card():
    """Dry run: CPU launches planned for a 132-SM card's grid (run phase by phase)."""
    if DRY_RUN:
        with ops_mod._launch_knobs(_INTERPRETER_GRID_CAP=132):
            yield
    else:
        yield


def _sized(numel: int) -> None:
    """Dry run: skip weights too large for the interpreter."""
    if DRY_RUN and numel > DRY_MAX_ELEMENTS:
        pytest.skip(f"{numel} elements: beyond SN_FUSED_GPU_DRY_MAX_ELEMENTS in a dry run")


def _sync(*device) -> None:
    if not DRY_RUN:
        torch.cuda.synchronize(*device)

# (M, N) of the real layers (DESIGN.md §3/§4) plus awkward ones.
SHAPES = [
    (64, 27), (128, 1152), (128, 3), (1, 128), (1, 8192), (512, 4608), (768, 6912),
    (1536, 13824), (4096, 4096), (24576, 20), (1000, 1536), (12, 96), (20, 148), (1, 1), (257, 1023),
    (256, 8192),  # (the backward on chip with rows wider than its blocks, across 132 programs)
    (1536, 148), (768, 6900),  # (rows 4-element aligned: ROW_ALIGN, on chip and streaming)
]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _unit(n, dtype, gen):
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return (x / x.norm()).to(DEV, dtype)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _run_both(w, dim, n_iter, training, seed):
    gen = torch.Generator().manual_seed(seed)
    M = w.shape[dim]
    N = w.numel() // M
    u, v = _unit(M, w.dtype, gen), _unit(N, w.dtype, gen)
    u64, v64 = u.double(), v.double()
    sigma_buf = torch.full((), float("nan"), dtype=w.dtype, device=DEV)
    sem = new_semaphore(DEV)
    out, us, vs, sigma = spectral_norm_forward_fused(
        w, u, v, sigma_buf, sem, dim=dim, n_power_iterations=n_iter, training=training)
    ref_out, ref_sigma = reference.spectral_norm_reference(
        w.double(), u64, v64, dim=dim, n_power_iterations=n_iter, training=training)
    return dict(out=out, u=u, v=v, us=us, vs=vs, sigma=sigma, sigma_buf=sigma_buf, sem=sem,
                ref_out=ref_out, ref_sigma=ref_sigma, ref_u=u64, ref_v=v64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", SHAPES)
def test_forward_backward_vs_reference(M, N, dtype):
    _sized(M * N)
    torch.manual_seed(M * 7919 + N)
    w = torch.randn(M, N, device=DEV, dtype=dtype)
    for training in (True, False):
        r = _run_both(w, 0, 1, training, seed=M + N)
        tol = TOL[dtype] * (10 if dtype != torch.float32 and training else 1)
        assert torch.isfinite(r["out"]).all()
        assert _rel(r["out"], r["ref_out"]) < tol, training
        assert _rel(r["sigma"], r["ref_sigma"]) < tol
        assert torch.equal(r["sigma_buf"], r["sigma"])
        assert _rel(r["u"], r["ref_u"]) < tol and _rel(r["v"], r["ref_v"]) < tol
        assert torch.equal(r["us"], r["u"]) and torch.equal(r["vs"], r["v"])
        assert r["sem"].tolist()[0] in (0, -2**31)
    g = torch.randn_like(w)
    dw = spectral_norm_backward_fused(g, w, r["us"], r["vs"], r["sigma"], r["sem"])
    ref_dw = reference.spectral_norm_backward_reference(
        g.double(), w.double(), r["us"].double(), r["vs"].double(), r["sigma"].double(), 0)
    assert _rel(dw, ref_dw) < TOL[dtype] * 4


@pytest.mark.parametrize("n_iter", [1, 5])
def test_power_iterations_and_layouts(n_iter):
    """dim=1 (ConvTranspose), channels_last, sliced weights; outputs keep the weight's strides."""
    torch.manual_seed(n_iter)
    base = torch.randn(64, 96, 3, 3, device=DEV)
    cases = [
        (base, 0), (base, 1), (base.to(memory_format=torch.channels_last), 0),
        (base[:, ::2], 0), (base.permute(1, 0, 2, 3), 1), (base[:40, :50, :, :2], -1),
    ]
    for w, dim in cases:
        r = _run_both(w, dim % w.ndim, n_iter, True, seed=n_iter)
        assert _rel(r["out"], r["ref_out"]) < 5e-5, (w.shape, w.stride(), dim)
        assert _rel(r["u"], r["ref_u"]) < 5e-5 and _rel(r["v"], r["ref_v"]) < 5e-5
        # Same strides as ``weight / sigma`` gives (the weight's own where it is dense).
        assert r["out"].stride() == (w / 2).stride()


@pytest.mark.parametrize("make, dim", [
    (lambda: torch.randn(768, 768, 3, 3, device=DEV).to(memory_format=torch.channels_last), 0),
    (lambda: torch.randn(128, 64, 3, 3, 3, device=DEV).to(memory_format=torch.channels_last_3d), 0),
    (lambda: torch.randn(768, 768, 3, 3, device=DEV), 1),
    (lambda: torch.randn(1024, 512, 3, 3, device=DEV), 1),
    (lambda: torch.randn(256, 256, 3, 3, device=DEV).to(memory_format=torch.channels_last), 1),
    (lambda: torch.randn(768, 6901, device=DEV), 0),
    (lambda: torch.randn(768, 3501, device=DEV), 0),
    (lambda: torch.randn(768, 6900, device=DEV), 0),
    (lambda: torch.randn(1536, 148, device=DEV), 0),
], ids=["conv-channels_last", "conv3d-channels_last_3d", "convT3x3-dim1", "convT3x3-wide-dim1",
        "convT3x3-channels_last-dim1", "rows-misaligned", "rows-misaligned-on-chip-before", "rows-4-aligned",
        "rows-4-aligned-on-chip"])
def test_walked_and_per_element_layouts(make, dim):
    """Real-size weights whose columns the kernels walk in memory order (v through its own
    strides) or whose tiles load element by element (smaller streaming tiles; 9216-wide rows in
    column blocks; rows not 16-element aligned, whose backward streams smaller tiles) or whose
    rows the kernels are told are 4-element aligned (ROW_ALIGN: 16-byte loads), in one launch
    on the card's grid: reads (n = 1, 2, eval) and the backward (an incoming gradient in W_sn's
    strides and a contiguous one) against the float64 reference."""
    w = make()
    _sized(w.numel())
    for n_iter, training in ((1, True), (2, True), (1, False)):
        r = _run_both(w, dim, n_iter, training, seed=n_iter)
        assert _rel(r["out"], r["ref_out"]) < 5e-5 and _rel(r["sigma"], r["ref_sigma"]) < 5e-5
        assert _rel(r["u"], r["ref_u"]) < 5e-5 and _rel(r["v"], r["ref_v"]) < 5e-5
        assert r["out"].stride() == w.stride()
    for g in (torch.randn_like(w), torch.randn(w.shape, device=DEV)):
        dw = spectral_norm_backward_fused(g, w, r["us"], r["vs"], r["sigma"], r["sem"], dim=dim)
        ref_dw = reference.spectral_norm_backward_reference(
            g.double(), w.double(), r["us"].double(), r["vs"].double(), r["sigma"].double(), dim)
        assert _rel(dw, ref_dw) < 1e-4 and dw.stride() == w.stride()


@pytest.mark.parametrize("wide_w, wide_g, dtype, aligns", [
    (152, 150, torch.float32, (4, 2)),  # W's rows 152 apart, W_sn's 148, G's 150
    (160, 148, torch.float32, (4, 4)),
    (328, 328, torch.bfloat16, (8, 8)),  # 16-byte vectors of bfloat16
    (336, 330, torch.bfloat16, (8, 2)),
], ids=["f32-152-150", "f32-160-148", "bf16-328", "bf16-336-330"])
def test_row_align_of_tensors_with_their_own_row_strides(wide_w, wide_g, dtype, aligns):
    """ROW_ALIGN where the tensors' row strides differ (a weight and a gradient sliced from wider
    rows; W_sn and dW dense): what all of them share, so the vector loads the compiler emits
    for each are aligned on the card. Reads and the backward against the float64 reference."""
    _sized(1536 * 160)
    N = 148 if wide_w in (152, 160) else 328
    M = 1536 if dtype == torch.float32 else 256
    w = torch.randn(M, wide_w, device=DEV, dtype=dtype)[:, :N]
    g = torch.randn(M, wide_g, device=DEV, dtype=dtype)[:, :N]
    layout = ops_mod._matrix_layout(0, w, torch.empty(M, N, device=DEV))
    assert ops_mod._row_align(layout) == aligns[0]
    tol = 5e-5 if dtype == torch.float32 else 2e-2
    for n_iter, training in ((1, True), (2, True), (1, False)):
        r = _run_both(w, 0, n_iter, training, seed=n_iter)
        assert _rel(r["out"], r["ref_out"]) < tol and _rel(r["sigma"], r["ref_sigma"]) < tol
        uv_tol = tol * (10 if dtype != torch.float32 and training else 1)  # (as test_forward_backward_vs_reference)
        assert _rel(r["u"], r["ref_u"]) < uv_tol and _rel(r["v"], r["ref_v"]) < uv_tol
    layout = ops_mod._matrix_layout(0, g, w, torch.empty(M, N, device=DEV))
    assert ops_mod._row_align(layout) == aligns[1]
    dw = spectral_norm_backward_fused(g, w, r["us"], r["vs"], r["sigma"], r["sem"], dim=0)
    ref_dw = reference.spectral_norm_backward_reference(
        g.double(), w.double(), r["us"].double(), r["vs"].double(), r["sigma"].double(), 0)
    assert _rel(dw, ref_dw) < 1e-4 * (1 if dtype == torch.float32 else 100)


def test_deterministic_bitwise():
    _sized(1536 * 13824)
    torch.manual_seed(0)
    w = torch.randn(1536, 13824, device=DEV)
    results = []
    for _ in range(3):
        r = _run_both(w, 0, 2, True, seed=5)
        g = torch.randn(w.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(1))
        dw = spectral_norm_backward_fused(g, w, r["us"], r["vs"], r["sigma"], r["sem"])
        results.append((r["out"], r["u"], r["v"], r["sigma"], dw))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# The ways to load A: (name, knobs), each stage count given (the default's 0 picks 3 or 1 by the
# weight's size: 3/3 on 1536x13824 here, 1/1 on the others); the prefetches are off by default.
_LOAD_VARIANTS = [
    ("default", {}),
    ("unpipelined", dict(_LOAD_STAGES=1, _RESCALE_STAGES=1)),
    ("load_stages", dict(_LOAD_STAGES=3, _RESCALE_STAGES=1)),
    ("rescale_stages", dict(_LOAD_STAGES=1, _RESCALE_STAGES=3)),
    ("both_stages", dict(_LOAD_STAGES=3, _RESCALE_STAGES=3)),
    ("load_prefetch", dict(_LOAD_PREFETCH=1, _LOAD_STAGES=1, _RESCALE_STAGES=1)),
    ("rescale_prefetch", dict(_RESCALE_PREFETCH=1, _LOAD_STAGES=1, _RESCALE_STAGES=1)),
    ("both_prefetch", dict(_LOAD_PREFETCH=1, _RESCALE_PREFETCH=1, _LOAD_STAGES=1, _RESCALE_STAGES=1)),
]
_LOAD_FIELDS = ("out", "u", "v", "us", "vs", "sigma")


def _read_with_knobs(w, knobs):
    """One training read (n = 2) of ``w`` with launch ``knobs`` set: (the plan's cfg, the read's
    W_sn, u, v, saved u, v, sigma)."""
    with ops_mod._launch_knobs(**knobs):
        cfg = ops_mod._forward_plan(w.shape, w.stride(), w.stride(), 0, w.device, 2, True, None, None, 4).cfg
        r = _run_both(w, 0, 2, True, seed=3)
    assert _rel(r["out"], r["ref_out"]) < 1e-5
    return cfg, [r[k] for k in _LOAD_FIELDS]


@pytest.mark.parametrize("M,N", [(1000, 1536), (256, 8192), (512, 2304)])
def test_kept_tile_bitwise(M, N):
    """KEEP_A (the default on these weights: rows in one tile, a table too large for ON_CHIP)
    keeps the one tile the streaming read's loops load per program, so its read (training, n = 2)
    is the streaming read's (``_KEEP_A=0``) bit for bit, as in the interpreter
    (tests/test_ops.py), unless the compiler contracts the same sums differently in the two
    binaries: a failure names the fields that differ and by how much."""
    _sized(M * N)
    torch.manual_seed(M)
    w = torch.randn(M, N, device=DEV)
    kept_cfg, kept = _read_with_knobs(w, {})
    cfg, streaming = _read_with_knobs(w, {"_KEEP_A": 0})
    assert kept_cfg.KEEP_A and not cfg.KEEP_A and not kept_cfg.ON_CHIP and kept_cfg.grid > 1
    differ = {k: (a.double() - b.double()).abs().max().item()
              for k, a, b in zip(_LOAD_FIELDS, kept, streaming) if not torch.equal(a, b)}
    assert not differ, f"{M}x{N}: max |difference| of the kept read from the streaming one {differ}"


@pytest.mark.parametrize("variant", [name for name, _ in _LOAD_VARIANTS])
@pytest.mark.parametrize("M,N", [(1536, 13824), (768, 6912), (4096, 1024)])
def test_load_variants_bitwise(M, N, variant):
    """Pipelined loads over A (``_LOAD_STAGES``, ``_RESCALE_STAGES``) and loads one tile ahead
    in registers (``_LOAD_PREFETCH``, ``_RESCALE_PREFETCH``) change when tiles arrive, not what
    is computed: W_sn, u, v, sigma and the saved vectors as a default read's, on the grid this
    GPU gives these weights; and the default read twice is bitwise itself (the kernel's
    determinism on this shape). Bitwise, unless the variant pipelines phase ST's loop where the
    default does not or the other way round: then u and v may move by a few ulps (W_sn and sigma
    stayed bitwise on an H200: sigma is stationary in v; bench/NOTES.md v17). Seen on 768x6912,
    up to 1.5e-8 on u (about an ulp of its largest entries), never in the interpreter, which runs a
    pipelined loop as a plain one; the cause is not found (the TTGIR has the same tile layout and
    float ops, the PTX and SASS the same instruction counts). A failure names the fields that
    differ and by how much."""
    _sized(M * N)
    knobs = dict(_LOAD_VARIANTS)[variant]
    torch.manual_seed(0)
    w = torch.randn(M, N, device=DEV)
    base_cfg, base = _read_with_knobs(w, {})
    cfg, other = _read_with_knobs(w, knobs)
    as_launched = {"_LOAD_STAGES": cfg.LOAD_STAGES, "_RESCALE_STAGES": cfg.RESCALE_STAGES,
                   "_LOAD_PREFETCH": cfg.LOAD_PREFETCH, "_RESCALE_PREFETCH": cfg.RESCALE_PREFETCH}
    if any(as_launched[k] != value for k, value in knobs.items() if k.endswith("PREFETCH")):
        pytest.skip(f"the launcher does not take {knobs} on {M}x{N} (launched: {as_launched})")
    if variant != "default" and cfg == base_cfg:
        pytest.skip(f"{variant} is the default's loads on {M}x{N} ({as_launched})")
    differ = {k: (a.double() - b.double()).abs().max().item()
              for k, a, b in zip(_LOAD_FIELDS, base, other) if not torch.equal(a, b)}
    if (cfg.LOAD_STAGES > 1) == (base_cfg.LOAD_STAGES > 1):
        assert not differ, f"{variant} on {M}x{N} ({as_launched}): max |difference| from a default read {differ}"
    else:
        ulps = {k: (a.double() - b.double()).abs().max().item() / torch.finfo(a.dtype).eps / b.abs().max().item()
                for k, a, b in zip(_LOAD_FIELDS, base, other)}
        assert max(ulps.values()) <= 16, f"{variant} on {M}x{N} ({as_launched}): ulps of the largest entry {ulps}"


@pytest.mark.parametrize("tile,stages", [(32768, 2), (16384, 3)])
@pytest.mark.parametrize("M,N", [(1536, 13824), (768, 6912)])
def test_grad_stages_bitwise(M, N, tile, stages):
    """``_GRAD_STAGES`` (the backward's GRAD pass as one pipelined flat loop, off by default until
    measured) changes when G's tiles arrive, not dW: the pass is elementwise, so dW is bitwise the
    nested loops' with the same tiles (the dot pass, whose sum order the tiles set, is the same)."""
    _sized(M * N)
    torch.manual_seed(0)
    w = torch.randn(M, N, device=DEV)
    r = _run_both(w, 0, 1, True, seed=3)
    g = torch.randn(M, N, device=DEV)
    dws = []
    for s in (1, stages):
        with ops_mod._launch_knobs(_GRAD_STAGES=s, _BWD_TILE_ELEMENTS=tile):
            cfg = ops_mod._backward_plan(w.shape, w.stride(), w.stride(), w.stride(), 0, w.device, None, None).cfg
            assert cfg.GRAD_STAGES == s and cfg.BLOCK_M * cfg.BLOCK_N == tile, cfg
            dws.append(spectral_norm_backward_fused(g, w, r["us"], r["vs"], r["sigma"], r["sem"]))
    ref = reference.spectral_norm_backward_reference(g.double(), w.double(), r["us"].double(), r["vs"].double(),
                                                     r["sigma"].double(), 0)
    assert _rel(dws[1], ref) < 1e-5
    assert torch.equal(dws[0], dws[1]), (dws[0] - dws[1]).abs().max().item()


@cuda_only
def test_one_launch_per_read_and_per_backward():
    m = sn_fused.spectral_norm(torch.nn.Conv2d(128, 128, 3).to(DEV))
    m.weight  # compile the kernels
    fwd = cuda_kernel_names(lambda: m.weight)
    assert len(fwd) == 1 and "spectral_norm_fwd_kernel" in fwd[0], fwd
    w = m.weight
    g = torch.randn_like(w)
    w.backward(g)  # compile
    w = m.weight
    bwd = cuda_kernel_names(lambda: w.backward(g))
    # The backward itself is one launch; autograd accumulating into .grad may add one more op.
    sn_kernels = [k for k in bwd if "spectral_norm" in k]
    assert len(sn_kernels) == 1 and "bwd" in sn_kernels[0], bwd
    m.eval()
    assert len(cuda_kernel_names(lambda: m.weight)) == 1


@cuda_only
def test_grid_is_capped_by_co_residency():
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for M, N in SHAPES:
        cfg = ops_mod._launch_config(M, N, DEV, None)
        assert 1 <= cfg.grid <= min(sms, M)


@cuda_only
def test_cuda_graph_replay():
    torch.manual_seed(0)
    m = sn_fused.spectral_norm(torch.nn.Linear(1152, 128).to(DEV))
    twin = copy.deepcopy(m)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            m.weight
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m.weight
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    # The twin does the same 2 + 1 (capture does not run) + 50 reads eagerly.
    for _ in range(52):
        expected = twin.weight
    p, q = m.parametrizations.weight[0], twin.parametrizations.weight[0]
    assert _rel(out, expected) < 1e-5
    assert _rel(p._u, q._u) < 1e-5 and _rel(p._v, q._v) < 1e-5
    assert p._sem.tolist()[0] in (0, -2**31)


def _disc():
    return torch.nn.Sequential(
        sn_fused.spectral_norm(torch.nn.Conv2d(3, 64, 3, padding=1)), torch.nn.LeakyReLU(0.1),
        sn_fused.spectral_norm(torch.nn.Conv2d(64, 128, 4, stride=2, padding=1)), torch.nn.LeakyReLU(0.1),
        torch.nn.Flatten(), sn_fused.spectral_norm(torch.nn.Linear(128 * 16 * 16, 1)),
    ).to(DEV)


@cuda_only
def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    # cuDNN convolutions may use TF32 (1e-3 differences between algorithms); SN is what is checked here.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = _disc()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 32, 32, device=DEV)
    for _ in range(3):
        out_c = compiled(x)
        out_e = twin(x)
        out_c.mean().backward()
        out_e.mean().backward()
    assert _rel(out_c, out_e) < 1e-4
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert _rel(a.grad, b.grad) < 1e-4, name
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        if name.endswith(("_u", "_v")):
            assert _rel(a, b) < 1e-5, name


@cuda_only
def test_two_modules_on_two_streams():
    torch.manual_seed(0)
    ms = [sn_fused.spectral_norm(torch.nn.Linear(4096, 4096).to(DEV)) for _ in range(2)]
    twins = [copy.deepcopy(m) for m in ms]
    streams = [torch.cuda.Stream() for _ in ms]
    torch.cuda.synchronize()
    outs = [None, None]
    for _ in range(5):
        for i, (m, s) in enumerate(zip(ms, streams)):
            with torch.cuda.stream(s):
                outs[i] = m.weight
    torch.cuda.synchronize()
    for i, t in enumerate(twins):
        for _ in range(5):
            expected = t.weight
        assert _rel(outs[i], expected) < 1e-5


# Two threads read each layer (eval, and the weight's gradient) at the same time, each on a
# stream of its own, as a server sharing one model between request threads would. Each stream
# first sleeps on the GPU while its thread queues 200 reads behind it, so the two streams' launches
# overlap; every read is compared on the GPU (no host sync) with one on the default stream, bit
# for bit (an eval read and its backward are deterministic).
_TWO_STREAMS_SCRIPT = r"""
import faulthandler, sys, threading
import torch, sn_fused
faulthandler.dump_traceback_later(80, exit=False, file=sys.stderr)  # (a hang: where the threads wait)
torch.manual_seed(0)
for M, N in ((128, 1152), (24576, 20)):  # 18 and 120 programs
    m = sn_fused.spectral_norm(torch.nn.Linear(N, M)).cuda().eval()
    weight = m.parametrizations.weight.original
    g = torch.randn(M, N, device="cuda")
    expected = m.weight  # (the default stream, the first to read: the layer's _sem)
    expected_grad, = torch.autograd.grad(expected, weight, g)
    expected = expected.detach()
    streams = [torch.cuda.Stream() for _ in range(2)]
    bad = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in range(2)]
    done, errors = [0, 0], []
    torch.cuda.synchronize()
    go = threading.Barrier(2)
    def reads(i):
        try:
            with torch.cuda.stream(streams[i]):
                go.wait()
                torch.cuda._sleep(200_000_000)
                for _ in range(200):
                    w = m.weight
                    grad, = torch.autograd.grad(w, weight, g)
                    bad[i] += (w != expected).any() | (grad != expected_grad).any()
                    done[i] += 1
        except BaseException as error:
            errors.append(repr(error))
    threads = [threading.Thread(target=reads, args=(i,)) for i in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    torch.cuda.synchronize()
    p = m.parametrizations.weight[0]
    sems = [p._sem] + list((p._stream_sems or {}).values())
    print(f"{M}x{N}: reads {done}, wrong {[int(b) for b in bad]}, errors {errors}, semaphores {len(sems)}, "
          f"at rest {all(x in (0, -2**31) for s in sems for x in s.tolist())}", flush=True)
"""


@cuda_only
def test_one_layer_read_on_two_streams_at_once():
    """Each stream's reads of a layer take a semaphore of their own (``_stream_semaphore``): the
    grid barriers of overlapping launches must never count each other's programs. In a
    subprocess with a time limit, because a shared semaphore can hang (bench/NOTES.md v24: two
    streams' overlapping reads of 128x1152 on one semaphore hung an H200)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (this checkout's sn_fused)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, "-c", _TWO_STREAMS_SCRIPT], capture_output=True,
                                text=True, timeout=90, cwd=root, env=env)
    except subprocess.TimeoutExpired as error:  # (its output: bytes, whatever text= says)
        out, err = (x.decode() if isinstance(x, bytes) else x or "" for x in (error.stdout, error.stderr))
        pytest.fail(f"timed out (a hang?):\n{out}\n{err}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["128x1152", "24576x20"], result.stdout
    for line in lines:
        assert line.split(": ", 1)[1] == "reads [200, 200], wrong [0, 0], errors [], semaphores 3, at rest True", \
            result.stdout


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_a_device_that_is_not_the_current_one():
    """A layer on cuda:1 read (forward and backward, first and kept launches) while cuda:0 is
    current: the launches go to cuda:1, as PyTorch's ops would."""
    torch.manual_seed(0)
    m = sn_fused.spectral_norm(torch.nn.Linear(1152, 128)).to("cuda:1")
    twin = copy.deepcopy(m)
    g = torch.randn(128, 1152, device="cuda:1")
    with torch.cuda.device(0):
        for _ in range(3):
            w = m.weight
            w.backward(g)
        torch.cuda.synchronize(1)
    with torch.cuda.device(1):
        for _ in range(3):
            expected = twin.weight
            expected.backward(g)
    assert w.device == torch.device("cuda", 1) and _rel(w, expected) < 1e-5
    assert _rel(m.parametrizations.weight.original.grad, twin.parametrizations.weight.original.grad) < 1e-5


@cuda_only
def test_launch_under_load_makes_progress():
    """A big matmul on another stream occupies SMs; the cooperative launch must still finish right."""
    torch.manual_seed(0)
    m = sn_fused.spectral_norm(torch.nn.Linear(13824, 1536).to(DEV))
    twin = copy.deepcopy(m)
    a = torch.randn(8192, 8192, device=DEV)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for _ in range(4):
            a = a @ a
            a = a / a.norm()
    w = m.weight
    torch.cuda.synchronize()
    assert _rel(w, twin.weight) < 1e-5


@cuda_only
def test_autocast_keeps_weight_dtype():
    m = sn_fused.spectral_norm(torch.nn.Linear(256, 128).to(DEV))
    with torch.autocast("cuda", dtype=torch.float16):
        w = m.weight
    assert w.dtype == torch.float32
    assert m.parametrizations.weight[0]._u.dtype == torch.float32


@pytest.mark.parametrize("M,N", [(512, 4608), (24576, 20), (4096, 64), (1, 8192)])
def test_overflow_fallback_single_launch(M, N, path):
    """The overflow fallback is a branch with two extra grid barriers inside the one launch:
    every program must take it (or none), or the launch hangs. A float32 weight with one
    huge row, so ||W v||^2 overflows: the result must be PyTorch's own ops' (same u, v,
    sigma, W_sn, NaN/Inf pattern included), and the semaphore back at rest."""
    _sized(M * N)
    gen = torch.Generator().manual_seed(M + N)
    w = torch.randn(M, N, generator=gen).to(DEV)
    if path_taken(w, 0, None) != path:
        pytest.skip(f"{M}x{N} does not take the {path} path")
    w[M // 2] = 3e25
    u, v = _unit(M, torch.float32, gen), _unit(N, torch.float32, gen)
    for n in (1, 2):
        u_ref, v_ref = u.clone(), v.clone()
        want, sigma_ref = reference.spectral_norm_reference(w, u_ref, v_ref, n_power_iterations=n)
        sem = new_semaphore(DEV)
        out, us, vs, sigma = spectral_norm_forward_fused(w, u.clone(), v.clone(), torch.zeros((), device=DEV),
                                                         sem, n_power_iterations=n)
        _sync()
        for got, exp in ((us, u_ref), (vs, v_ref), (sigma, sigma_ref), (out, want)):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert sem.tolist()[0] in (0, -2**31)


def _rare_t_case(case, gen):
    """(W, u, v, eps) of a 64 x 300 float32 read (3 programs by default; columns 0, 100 and 200 in
    three programs' runs) whose t needs the statistics ``_rare_stats_needed`` gates."""
    W = 1e-3 * torch.randn(64, 300, generator=gen)
    u, v = torch.randn(64, generator=gen), torch.randn(300, generator=gen)
    eps = 1e-12
    if case == "tiny-t":  # ||t||^2 underflows: sigma from the 2^64-scaled sums, eps below it
        W, v, eps = W * 1e-25, v * 1e20, 1e-30
    elif case == "inf-in-t":  # A^T u has an Inf entry, no NaN: sigma and W_sn NaN, as PyTorch's
        W[:2, 0], v[0] = 3e38, 1e-30
    else:  # "finite-parts-inf-total": each program's part of ||t||^2 finite, their sum not
        W.zero_()
        W[0, [0, 100, 200]] = 1.5e19
        W[0, 1], W[1, 2] = 1.0, 0.5
        v.zero_()
        v[1], v[2] = 1.0, 1e-3
        u.zero_()
        u[0] = 1.0
    return W.to(DEV), u.to(DEV), v.to(DEV), eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subnormal_sum_of_squares_with_eps_zero(dtype, path):
    """eps = 0 and entries ~1e-21: ||A v||^2 and ||t||^2 are float32 subnormals. PyTorch's norm
    keeps them; the square root of a float32 norm is sqrt.rn, not sqrt.approx.ftz, which would
    flush them to 0 and give u = s / 0 (kernels.py ``_norm_of``). One training read, one launch of
    several programs, each read path, against PyTorch's own ops: u to float32 rounding; v, sigma
    and W_sn finite and close (norm-wise; v 4e-4 in the interpreter: ``A^T s`` of products near
    1e-41 is itself subnormal here, where PyTorch's ``A^T u`` is not, a divergence the kernels
    accept for weights below ~1e-19, tests/test_fuzz.py ``Oracle``)."""
    gen = torch.Generator().manual_seed(21)
    W = (1e-21 * torch.randn(64, 300, generator=gen)).to(DEV, dtype)
    if path_taken(W, 0, None) != path:
        pytest.skip(f"64x300 does not take the {path} path")
    u, v = _unit(64, dtype, gen), _unit(300, dtype, gen)
    u_ref, v_ref = u.to(torch.float32, copy=True), v.to(torch.float32, copy=True)  # (the reference writes them)
    want, sigma_ref = reference.spectral_norm_reference(W.float(), u_ref, v_ref, eps=0.0)
    assert 0 < (W.float() @ v.float()).square().sum() < torch.finfo(torch.float32).tiny  # (subnormal)
    sem = new_semaphore(DEV)
    out, us, vs, sigma = spectral_norm_forward_fused(W, u.clone(), v.clone(), torch.zeros((), device=DEV, dtype=dtype),
                                                     sem, eps=0.0)
    _sync()
    assert all(torch.isfinite(x).all() for x in (out, us, vs, sigma))
    tight, loose = (1e-5, 5e-3) if dtype == torch.float32 else (1e-2, 1e-2)
    assert _rel(us, u_ref) < tight and _rel(vs, v_ref) < loose
    assert _rel(sigma, sigma_ref) < loose and _rel(out, want) < loose
    assert sem.tolist()[0] in (0, -2**31)


@pytest.mark.parametrize("case", ["tiny-t", "inf-in-t", "finite-parts-inf-total"])
def test_rare_t_statistics_single_launch(case, path):
    """t's non-finite marker and 2^64-scaled sum of squares are summed only where ||t||^2 (or a
    program's part of it) is tiny or not finite (kernels.py ``_rare_stats_needed``): in one launch
    of several programs, each deciding for its own partials, u, v, sigma and W_sn are PyTorch's
    own ops' (NaN/Inf pattern included), and the semaphore is back at rest."""
    gen = torch.Generator().manual_seed(len(case))
    W, u, v, eps = _rare_t_case(case, gen)
    if path_taken(W, 0, None) != path:
        pytest.skip(f"64x300 does not take the {path} path")
    assert ops_mod._launch_config(64, 300, DEV, None).grid > 1
    u_ref, v_ref = u.clone(), v.clone()
    want, sigma_ref = reference.spectral_norm_reference(W, u_ref, v_ref, eps=eps)
    sem = new_semaphore(DEV)
    out, us, vs, sigma = spectral_norm_forward_fused(W, u.clone(), v.clone(), torch.zeros((), device=DEV), sem,
                                                     eps=eps)
    _sync()
    for got, exp in ((us, u_ref), (vs, v_ref), (sigma, sigma_ref), (out, want)):
        # (t = A^T s / du here, A^T u there: entries that cancel differ by more than rtol alone)
        scale = exp.nan_to_num(0.0, 0.0, 0.0).abs().max().item()
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)
    assert sem.tolist()[0] in (0, -2**31)
