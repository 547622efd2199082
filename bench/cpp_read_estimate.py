"""Experiment: what would a C++ read save in host time? (CPU, launches stubbed out; not a test.)

    TRITON_INTERPRET=1 python -m bench.cpp_read_estimate     # needs a C++ compiler and ninja

Issue #3's eager goal (>= 6x PyTorch's SN per read) is host time: a layer read is ~30 us
of Python on a CPU (``bench/host_time.py``), most of it around the launch. This builds a
throwaway C++ extension (``torch.utils.cpp_extension.load_inline``) with what a C++ fast
path would do per read, the kernel launch replaced by a no-op that takes the packed
parameters:

* ``body``: allocate ``W_sn`` (weight's strides) and ``saved`` (M + N + 1), take 8 data
  pointers (their 16-byte alignment, the runner key) and pack ~35 launch parameters;
* ``read``: that body inside a ``torch::autograd::Function`` that saves ``(weight, saved)``
  and whose backward allocates dW and packs its launch the same way.

Timed next to today's Python: ``_forward_unchecked`` (the body: plan, allocations,
workspace, ``_launch`` down to the kept runner, a no-op here as in ``host_time``), the whole
``m.weight`` read (the layer's preamble and signature check, then the Python Function), and
the same ``m.weight`` with only ``_spectral_norm_checked`` swapped for the C++ ``read``.
Min over interleaved rounds. What this leaves out: the real launch (``cuLaunchKernelEx``
and the current stream, the same cost either way), and what a real C++ path must also
carry: a Python fallback for double backward and batched gradients, the device guard,
profiler hooks, and the launch of a Triton cubin from C++ (parameters as the compiled
signature has them). So it bounds the gain; it is not an implementation.
"""

from __future__ import annotations

import os
import sys
import tempfile

CPP = r"""
#include <torch/extension.h>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

static volatile int64_t sink = 0;
// The launch, stubbed: takes the parameter array as cuLaunchKernelEx would.
static void launch_stub(void** params, int n) { sink += n + (params[0] != nullptr); }

static std::tuple<at::Tensor, at::Tensor> body(const at::Tensor& weight, const at::Tensor& u,
        const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sem, int64_t saved_numel,
        double eps) {
  auto out = at::empty_like(weight, at::MemoryFormat::Preserve);
  auto saved = at::empty({saved_numel}, weight.options());
  void* ptrs[8] = {weight.data_ptr(), out.data_ptr(), u.data_ptr(), v.data_ptr(),
                   saved.data_ptr(), sigma.data_ptr(), nullptr, sem.data_ptr()};
  uintptr_t any = 0;
  for (auto p : ptrs) any |= reinterpret_cast<uintptr_t>(p);  // alignment: the runner key
  int32_t ints[26];
  for (int i = 0; i < 26; i++) ints[i] = i;  // sizes, strides, flags, blocks (from the plan)
  void* params[40];
  int k = 0;
  for (auto& p : ptrs) params[k++] = &p;
  params[k++] = &eps;
  for (auto& i : ints) params[k++] = &i;
  launch_stub(params, k + static_cast<int>(any & 15));
  return {out, saved};
}

struct SpectralNormCpp : public torch::autograd::Function<SpectralNormCpp> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor weight, at::Tensor u, at::Tensor v,
                            at::Tensor sigma, at::Tensor sem, int64_t saved_numel, double eps) {
    auto [out, saved] = body(weight, u, v, sigma, sem, saved_numel, eps);
    ctx->save_for_backward({weight, saved});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto dw = at::empty_like(s[0], at::MemoryFormat::Preserve);
    void* ptrs[6] = {grads[0].data_ptr(), s[0].data_ptr(), dw.data_ptr(), s[1].data_ptr(), nullptr, nullptr};
    launch_stub(ptrs, 6);
    return {dw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

static at::Tensor sn_read(at::Tensor weight, at::Tensor u, at::Tensor v, at::Tensor sigma,
                          at::Tensor sem, int64_t saved_numel, double eps) {
  return SpectralNormCpp::apply(weight, u, v, sigma, sem, saved_numel, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read", &sn_read);
  m.def("body", &body);
}
"""

ROUNDS, CALLS = 30, 200


def main() -> None:
    import torch
    from torch.utils.cpp_extension import load_inline

    import sn_fused
    from bench import host_time
    from sn_fused import parametrizations
    from sn_fused.ops import INTERPRET
    from sn_fused.ops import spectral_norm as ops_mod

    if not INTERPRET:
        sys.exit("run with TRITON_INTERPRET=1 (CPU weights take the fused path then)")
    with tempfile.TemporaryDirectory() as build:
        ext = load_inline("sn_fused_cpp_read_estimate", cpp_sources=CPP, extra_cflags=["-O2"],
                          build_directory=build)

    python_checked = parametrizations._spectral_norm_checked

    def cpp_checked(weight, u, v, sigma_buf, sem, dim, n, eps, training):
        return ext.read(weight, u, v, sigma_buf, sem, u.shape[0] + v.shape[0] + 1, eps)

    with host_time.stubbed_launches(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        python_layer = sn_fused.spectral_norm(torch.nn.Linear(16, 8, bias=False))
        cpp_layer = sn_fused.spectral_norm(torch.nn.Linear(16, 8, bias=False))
        floor = host_time._floor_module(fast_read=True)
        grad = torch.randn(8, 16)
        p = python_layer.parametrizations.weight[0]
        w = python_layer.parametrizations.weight.original
        u, v, sigma_buf, sem = p._u, p._v, p._sigma, p._sem

        def cpp_read():
            parametrizations._spectral_norm_checked = cpp_checked
            try:
                return cpp_layer.weight
            finally:
                parametrizations._spectral_norm_checked = python_checked

        rows = {
            "body: Python (_forward_unchecked)": lambda: ops_mod._forward_unchecked(
                w, u, v, sigma_buf, sem, 0, 1, 1e-12, True),
            "body: C++": lambda: ext.body(w, u, v, sigma_buf, sem, 8 + 16 + 1, 1e-12),
            "read: Python Function": lambda: python_layer.weight,
            "read: C++ Function": cpp_read,
            "read + backward: Python Function": lambda: torch.autograd.backward(python_layer.weight, grad),
            "read + backward: C++ Function": lambda: torch.autograd.backward(cpp_read(), grad),
            "floor read (host_time)": lambda: floor.weight,
            "floor read + backward (host_time)": lambda: torch.autograd.backward(floor.weight, grad),
        }
        out = cpp_read()
        assert out.shape == (8, 16) and out.grad_fn is not None, "the C++ read did not record"
        times = host_time.time_rows(rows, ROUNDS, CALLS)
    print(f"host us per call, launches stubbed out; min (median) of {ROUNDS} interleaved rounds, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    for name, ts in times.items():
        print(f"  {name:<36} {min(ts):6.1f} ({sorted(ts)[len(ts) // 2]:.1f})")


if __name__ == "__main__":
    main()
