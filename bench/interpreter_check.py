"""CPU-mode correctness check: the fused Triton kernels (interpreter) against the float64 oracle.

Needs ``TRITON_INTERPRET=1`` in the environment *before* Triton is imported;
``python -m bench`` on a machine without CUDA runs this module in a child
process with that variable set (``python -m bench --interpreter-check OUT``),
so the parent process keeps timing the ordinary CPU path.

Cases (small: the interpreter runs every program in Python):

* the drop-in module (``sn_fused.spectral_norm``), one program, through
  ``module.weight`` and autograd: a conv, a ConvTranspose (``dim=1``) and a
  1-row Linear with 5 power iterations;
* the ops with 3 programs launched phase by phase, which exercises the
  per-program partials and the fixed-order combines of the multi-program GPU
  path: once as launched (small weights take the ON_CHIP kernels) and once
  with the streaming kernels that large weights take (``SN_FUSED_ON_CHIP=0``).

Each compares W_sn, u, v, sigma and dL/dW with ``sn_fused.reference`` in
float64 (relative error, norm-wise).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

TOLERANCE = 2e-5  # fp32 kernels vs the float64 oracle, norm-wise relative error


def _check_environment() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the interpreter check needs TRITON_INTERPRET=1 set before Triton is imported")
    if "triton" in sys.modules and not _triton_interprets():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set")


def _triton_interprets() -> bool:
    from sn_fused.ops import INTERPRET

    return INTERPRET


def _module_case(layer, n: int) -> dict[str, Any]:
    import torch

    import sn_fused
    from sn_fused import reference
    from sn_fused.ops import fused_supported

    from .harness import _rel_err as _rel

    torch.manual_seed(0)
    module = layer.make("cpu", torch.float32).train()
    sn_fused.spectral_norm(module, n_power_iterations=n)
    par = module.parametrizations.weight
    sn = par[0]
    weight = par.original.detach()
    if not fused_supported(weight):
        raise RuntimeError("the fused path is not taken for this weight (interpreter off?)")
    ref_u, ref_v = sn._u.double().clone(), sn._v.double().clone()
    out = module.weight
    ref_out, ref_sigma = reference.spectral_norm_reference(
        weight.double(), ref_u, ref_v, dim=sn.dim, n_power_iterations=n, eps=sn.eps, training=True)
    g = torch.randn_like(weight)
    (grad,) = torch.autograd.grad(out, par.original, g)
    ref_grad = reference.spectral_norm_backward_reference(
        g.double(), weight.double(), ref_u, ref_v, ref_sigma, sn.dim)
    return dict(out=_rel(out, ref_out), u=_rel(sn._u, ref_u), v=_rel(sn._v, ref_v),
                sigma=_rel(sn._sigma, ref_sigma), grad=_rel(grad, ref_grad))


def _phases_case(layer, n: int, programs: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from sn_fused import reference
    from sn_fused.ops import new_semaphore, spectral_norm_backward_fused, spectral_norm_forward_fused

    from .harness import _rel_err as _rel

    torch.manual_seed(0)
    weight = layer.make("cpu", torch.float32).weight.detach()
    M, N = layer.M, layer.N
    u, v = F.normalize(torch.randn(M), dim=0), F.normalize(torch.randn(N), dim=0)
    ref_u, ref_v = u.double(), v.double()
    sigma_buf, sem = torch.full((), float("nan")), new_semaphore("cpu")
    launch = dict(num_programs=programs, phase_by_phase=True)
    out, u_used, v_used, sigma = spectral_norm_forward_fused(
        weight, u, v, sigma_buf, sem, dim=layer.dim, n_power_iterations=n, eps=1e-12, training=True,
        **launch)
    ref_out, ref_sigma = reference.spectral_norm_reference(
        weight.double(), ref_u, ref_v, dim=layer.dim, n_power_iterations=n, training=True)
    g = torch.randn_like(weight)
    grad = spectral_norm_backward_fused(g, weight, u_used, v_used, sigma, sem, dim=layer.dim, **launch)
    ref_grad = reference.spectral_norm_backward_reference(
        g.double(), weight.double(), ref_u, ref_v, ref_sigma, layer.dim)
    return dict(out=_rel(out, ref_out), u=_rel(u, ref_u), v=_rel(v, ref_v),
                sigma=_rel(sigma, ref_sigma), grad=_rel(grad, ref_grad))


def _streaming(case):
    """Run ``case`` with the ON_CHIP kernels switched off (what large weights take)."""
    from sn_fused.ops import spectral_norm as ops_mod

    def run_case():
        with ops_mod._launch_knobs(_ON_CHIP=False):
            return case()
    return run_case


def cases():
    from .shapes import Layer

    return [
        ("module Conv2d(3, 64, 3) 64x27 n=1", lambda: _module_case(Layer("conv2d", (3, 64, 3)), 1)),
        ("module ConvTranspose2d(16, 8, 4) 8x256 dim=1 n=1",
         lambda: _module_case(Layer("convT2d", (16, 8, 4)), 1)),
        ("module Linear(128, 1) 1x128 n=5", lambda: _module_case(Layer("linear", (128, 1)), 5)),
        ("ops Conv2d(32, 64, 3) 64x288 n=2, 3 programs phase by phase",
         lambda: _phases_case(Layer("conv2d", (32, 64, 3)), 2, 3)),
        ("ops Conv2d(32, 64, 3) 64x288 n=2, 3 programs phase by phase, streaming kernels",
         _streaming(lambda: _phases_case(Layer("conv2d", (32, 64, 3)), 2, 3))),
    ]


def _worst(errors) -> float:
    """The largest error, NaN above all (``max`` passes over a NaN that is not first); NaN for none."""
    return max(errors, key=lambda e: math.inf if math.isnan(e) else e, default=math.nan)


def run() -> dict[str, Any]:
    """Run every case; ``{"ok", "summary", "cases": [...]}``."""
    _check_environment()
    results = []
    for name, fn in cases():
        t0 = time.perf_counter()
        entry: dict[str, Any] = dict(case=name)
        try:
            errors = fn()
            # (a NaN error fails: NaN <= x is False)
            entry.update(errors=errors, max_rel_err=_worst(errors.values()),
                         ok=all(e <= TOLERANCE for e in errors.values()))
        except Exception as exc:  # noqa: BLE001 -- reported as a failed case
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
    ok = all(r["ok"] for r in results)
    worst = _worst(r.get("max_rel_err", math.nan) for r in results)
    summary = (f"{sum(r['ok'] for r in results)}/{len(results)} cases within {TOLERANCE:g} "
               f"of the float64 reference (worst relative error {worst:.1e})")
    return dict(ok=ok, summary=summary, tolerance=TOLERANCE, cases=results)


def format_lines(check: dict[str, Any]) -> list[str]:
    lines = [f"Triton kernels (interpreter) vs float64 reference: {check['summary']}"]
    for r in check["cases"]:
        status = "ok  " if r["ok"] else "FAIL"
        detail = (", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()) if "errors" in r
                  else r.get("error", ""))
        lines.append(f"  {status} {r['case']}: {detail} ({r['seconds']:.1f} s)")
    return lines
