r"""The launcher's own launches compiled for Hopper (sm_90a) on any machine, and what ptxas says
of them: registers, spills. No GPU needed, only Triton's NVIDIA backend and its bundled ptxas.

A launch here is what ``sn_fused.ops.spectral_norm._launch`` would get for a read or a backward of
a weight on a 132-SM card (an H100/H200): the kernel, every argument, the plan's config. It is
compiled the way Triton compiles it on a launch (its own binder specializes ints equal to 1 and
adds 16-byte alignment hints; the launcher's options), then ``ptxas -v`` reports the binary's
resources. Used by ``tests/test_compile_sm90.py`` (spill and load-order checks) and, as a
scan of every default launch of the benchmark's layers::

    python -m bench.sm90 [--groups G,...] [--dtypes float32,bfloat16] [--extra MxN,...] [--jobs 2] [--spilling]

Import it without ``TRITON_INTERPRET`` set: the interpreter replaces ``triton.jit`` at import,
and there is nothing to compile then.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from sn_fused.ops import spectral_norm as snm

#: The card the launches are planned for and compiled to.
SMS = 132
TARGET = GPUTarget("cuda", 90, 32)


def _ptxas_for_sm90() -> str:
    """The ptxas Triton itself assembles sm_90 code with: its ``ptxas`` up to Triton 3.8, the newer
    one it ships as ``ptxas-blackwell`` from 3.9 (whose PTX the older ptxas refuses: "Unsupported
    .version 9.4")."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


PTXAS = _ptxas_for_sm90()
KINDS = ("training", "eval", "backward")


class Launch(NamedTuple):
    """One launch as ``_launch`` receives it (unpacks into ``compile_launch``'s arguments)."""

    kernel: object
    args: tuple
    cfg: object  # the plan's _LaunchConfig
    cooperative: bool


@contextlib.contextmanager
def captured_launches():
    """A list that collects the launcher's launches instead of running them."""
    launches = []
    launch = snm._launch
    snm._launch = lambda kernel, grid, args, cfg, coop, n_tensors, key, out: launches.append(
        Launch(kernel, args, cfg, coop))
    try:
        yield launches
    finally:
        snm._launch = launch


def launch_of(w: torch.Tensor, dim: int, kind: str, grid: int | None = None) -> Launch:
    """The launch of a read (``"training"``: one power iteration; ``"eval"``) or a ``"backward"``
    of weight ``w`` (a CPU tensor; only its shape, strides and dtype matter) along
    ``dim``, on ``grid`` programs (default: the grid a ``SMS``-SM card gives it), in one launch."""
    M = w.shape[dim]
    N = w.numel() // M
    grid = snm._default_grid(M, N, SMS) if grid is None else grid
    saved = torch.ones(M + N + 1, dtype=w.dtype)
    with captured_launches() as launches:
        if kind == "backward":
            snm._launch_backward(w, w, torch.empty_like(w), saved, snm.new_semaphore(), dim,
                                 num_programs=grid, phase_by_phase=False)
        elif kind in ("training", "eval"):
            snm._launch_forward(w, torch.empty_like(w), torch.randn(M, dtype=w.dtype),
                                torch.randn(N, dtype=w.dtype), saved, torch.empty((), dtype=w.dtype),
                                snm.new_semaphore(), dim, 1, 1e-12, kind == "training", num_programs=grid,
                                phase_by_phase=False)
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return launches[0]


def forward_launch(M: int, N: int, dtype: torch.dtype, training: bool) -> Launch:
    """The launch of a random ``M x N`` weight's read on ``SMS`` SMs."""
    return launch_of(torch.randn(M, N, dtype=dtype), 0, "training" if training else "eval")


def compile_launch(kernel, args, cfg, cooperative):
    """The ``CompiledKernel`` Triton would build for a launch (``compile_launch(*launch)``) on the
    target card."""
    # (the launcher's own options: warps, stages, registers)
    return compile_call(kernel, args, snm._launch_options(cfg, cooperative))


def compile_call(kernel, args, kwargs):
    """The ``CompiledKernel`` Triton would build for ``kernel[grid](*args, **kwargs)`` on the target
    card (constexprs and launch options in ``kwargs``; tensors may be on the meta device)."""
    backend = make_backend(TARGET)
    bound, spec, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                          options=options.__dict__)


@dataclasses.dataclass(frozen=True)
class Usage:
    """What ``ptxas -v`` reports for a binary: registers per thread, bytes of spill stores and
    spill loads in its code (static counts, not traffic)."""

    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> list[int]:
        return [self.spill_stores, self.spill_loads]


def ptxas_usage(compiled) -> Usage:
    """``ptxas -arch=sm_90a -v`` of ``compiled``'s PTX."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    registers = re.findall(r"Used (\d+) registers", out)
    if len(spills) != 2 or len(registers) != 1:
        raise RuntimeError(f"unexpected ptxas output:\n{out}")
    return Usage(int(registers[0]), *spills)


def local_accesses_in_loops(compiled) -> int:
    """Local-memory instructions (``LDL``/``STL``: spills) inside the binary's loops, counted in
    its SASS (``nvdisasm``; a loop is the code between a backward branch and its target, nested
    ones counted once). Spills outside the loops cost a few instructions per launch; inside, they
    add memory traffic to every step."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(os.path.dirname(PTXAS), "nvdisasm"), "-c", path],
                              capture_output=True, text=True, check=True).stdout
    code, label_at, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if ins:
            address = int(ins.group(1), 16)
            label_at.update((name, address) for name in pending)
            pending = []
            code.append((address, ins.group(2)))
    loops = [(label_at[m.group(1)], address) for address, text in code
             for m in [re.search(r"BRA.*`\(\.(L_x_\d+)\)", text)] if m and label_at.get(m.group(1), address + 1) <= address]
    return sum(1 for address, text in code if re.search(r"\b(LDL|STL)\b", text)
               and any(lo <= address <= hi for lo, hi in loops))


def global_loads(compiled) -> tuple[int, int]:
    """``(16-byte, narrower)``: the binary's global load instructions by width, in its PTX (the
    grid barrier's ``.acquire`` spin loads left out). A tile of A loads 16 bytes at a time only
    where Triton can prove the alignment (``kernels._multiple_of``); a scan whose tiles show
    none (``0/...``) loads them element by element (24576x20 before session 22: 0/66)."""
    wide = narrow = 0
    for op in re.findall(r"\bld\.global[.\w:]*", compiled.asm["ptx"]):
        if ".acquire" in op:
            continue
        bits = int(re.search(r"\.[bfsu](\d+)$", op).group(1))
        lanes = int(m.group(1)) if (m := re.search(r"\.v(\d)\.", op)) else 1
        if bits * lanes >= 128:
            wide += 1
        else:
            narrow += 1
    return wide, narrow


def spill_bytes(kernel, args, cfg, cooperative) -> list[int]:
    """``[stores, loads]``: bytes of spill code in a launch's sm_90a binary (``spill_bytes(*launch)``)."""
    return ptxas_usage(compile_launch(kernel, args, cfg, cooperative)).spills


# --------------------------------------------------------------------------- the scan


def _cases(groups, dtypes, extra):
    """(weight shape, dim, dtype, channels_last) of every layer of ``groups`` (each once),
    channels-last too for convs wider than 1x1, then the ``extra`` M x N weights."""
    from bench.shapes import select

    cases = []
    for layer in select(groups):
        for dtype in dtypes:
            for cl in (False, True) if layer.kind == "conv2d" and layer.args[2] > 1 else (False,):
                cases.append((layer.weight_shape, layer.dim, dtype, cl))
    cases += [((M, N), 0, dtype, False) for M, N in extra for dtype in dtypes]
    return cases


def _scan_case(case) -> list[dict]:
    shape, dim, dtype, cl = case
    w = torch.empty(shape, dtype=dtype)
    if cl:
        w = w.to(memory_format=torch.channels_last)
    rows = []
    for kind in KINDS:
        launch = launch_of(w, dim, kind)
        cfg = launch.cfg
        compiled = compile_launch(*launch)
        usage = ptxas_usage(compiled)
        in_loops = local_accesses_in_loops(compiled) if usage.spill_stores or usage.spill_loads else 0
        wide, narrow = global_loads(compiled)
        rows.append(dict(shape="x".join(map(str, shape)), dim=dim, dtype=str(dtype).removeprefix("torch."),
                         layout="channels_last" if cl else "", kind=kind,
                         tiles=f"{cfg.BLOCK_M}x{cfg.BLOCK_N}", path=cfg.path, warps=cfg.num_warps,
                         grid=cfg.grid, **dataclasses.asdict(usage), in_loops=in_loops, loads=f"{wide}/{narrow}"))
    return rows


def main(argv=None) -> int:
    from bench.shapes import TABLES

    ap = argparse.ArgumentParser(prog="python -m bench.sm90", description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default=",".join(TABLES), help="shape groups of bench/shapes.py (default: all)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--extra", default="", metavar="MxN,...", help="more (contiguous) weights")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (ptxas runs in each)")
    ap.add_argument("--spilling", action="store_true", help="print only the launches that spill")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the interpreter has nothing to compile")
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",") if d]
    extra = [tuple(int(x) for x in s.split("x")) for s in a.extra.split(",") if s]
    cases = _cases(a.groups.split(","), dtypes, extra)
    print(f"# {len(cases) * len(KINDS)} launches, sm_90a, {SMS} SMs, triton {triton.__version__}, "
          f"torch {torch.__version__}", flush=True)
    if a.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
            results = pool.map(_scan_case, cases, chunksize=1)
    else:
        results = [_scan_case(c) for c in cases]
    rows = [r for rs in results for r in rs]
    head = f"{'weight':>16} {'dim':>3} {'dtype':>8} {'layout':>13} {'kind':>8} {'tiles':>9} " \
           f"{'path':>9} {'warps':>5} {'grid':>4} {'loads 16B/less':>14} {'regs':>4} {'spill st/ld (B)':>15} " \
           f"{'LDL/STL in loops':>16}"
    print(head)
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    for r in spilling if a.spilling else rows:
        print(f"{r['shape']:>16} {r['dim']:>3} {r['dtype']:>8} {r['layout']:>13} {r['kind']:>8} "
              f"{r['tiles']:>9} {r['path']:>9} {r['warps']:>5} {r['grid']:>4} {r['loads']:>14} "
              f"{r['registers']:>4} {r['spill_stores']:>7}/{r['spill_loads']:<7} {r['in_loops']:>16}")
    print(f"# {len(spilling)} of {len(rows)} launches spill, "
          f"{sum(1 for r in spilling if r['in_loops'])} of them inside loops", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
