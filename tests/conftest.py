"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch

from sn_fused.ops import INTERPRET

if INTERPRET:
    # bfloat16 conversions as a GPU makes them, and a loud error for arithmetic on bfloat16 bits:
    # bfloat16 CPU weights then go through the kernels here, as on a GPU.
    import interpreter_bf16

    interpreter_bf16.install()


def fused_device_or_skip() -> str:
    """The device whose tensors go through the Triton kernels: ``"cpu"`` under
    ``TRITON_INTERPRET=1``, else ``"cuda"``. Without either the calling test module is
    skipped (call it at module level)."""
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs TRITON_INTERPRET=1 (set before importing triton) or a CUDA GPU",
                allow_module_level=True)


def run_module_on_cpu(module: str, *args: str, interpret: bool = True) -> str:
    """``python -m module args`` in a new process from this checkout, with ``TRITON_INTERPRET=1``
    (or without it: ``interpret``), a bench entry point's CPU mode: its stdout, after checking
    that it exited with 0."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=root, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def cuda_kernel_names(fn) -> list[str]:
    """The names of the CUDA kernels that ran during ``fn()``, in order, as the profiler saw
    them: every launch, also those of kept runners and of the C++ read, which no Python hook sees."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


#: float16/bfloat16 layers against PyTorch's SN: PyTorch rounds every op to the weight's dtype,
#: the kernels accumulate in float32 and round u, v, sigma and W_sn once each, so they differ by a
#: few of its ulps (bfloat16's passed at 1/4 of 4e-2 and 1.6e-2, session 26).
HALF_TOL = {torch.float16: dict(rtol=5e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=6.4e-3)}


#: The forward's read paths (kernels.py), as launch knobs: A on chip with every program summing the
#: whole table of partials (small weights, by default), A kept in registers through the streaming
#: phases (KEEP_A: by default where the table is larger; these knobs give it to every weight whose
#: rows fit one tile), and the streaming read.
FORWARD_PATHS = {"on-chip": {}, "kept": dict(_ON_CHIP_MAX_PARTIALS=0), "streaming": dict(_ON_CHIP=False)}


@contextlib.contextmanager
def forward_path(name: str):
    """Let the kernels take the read path ``name`` of ``FORWARD_PATHS`` where it applies.

    Small weights take ON_CHIP by default, so without this the other paths (phases R and F,
    the column-owner combine, the backward's re-read) would be tested on large weights only.
    The backward follows ``_ON_CHIP`` alone: on chip but for "streaming".
    """
    from sn_fused.ops import spectral_norm as snm

    with snm._launch_knobs(**FORWARD_PATHS[name]):
        yield


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test id: fresh inputs per test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=list(FORWARD_PATHS))
def path(request):
    """Every read path of the kernels (see ``forward_path``); the value is its name."""
    with forward_path(request.param):
        yield request.param


def path_taken(weight: torch.Tensor, dim: int, num_programs: int | None) -> str:
    """The ``FORWARD_PATHS`` name of the launcher's plan for this weight's forward."""
    from sn_fused.ops import spectral_norm as snm

    cfg = snm._forward_plan(tuple(weight.shape), weight.stride(), weight.stride(), dim, weight.device, 1, True,
                            num_programs, True, weight.element_size()).cfg
    return cfg.path


def two_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` wrapped in torch's ``TwoTensor`` (with a copy): a wrapper subclass, which has no
    storage of its own for a kernel to read (DTensor is one too)."""
    from torch.testing._internal.two_tensor import TwoTensor

    return TwoTensor(t, t.clone())


@contextlib.contextmanager
def list_forward_calls():
    """Count ``ParametrizationList.forward`` calls: torch's getter makes one per read of a
    parametrized tensor, sn_fused's fast read none. Yields the mock (``call_count``)."""
    from torch.nn.utils import parametrize

    forward = parametrize.ParametrizationList.forward
    with mock.patch.object(parametrize.ParametrizationList, "forward", autospec=True,
                           side_effect=forward) as counted:
        yield counted


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo cache: the layers' code objects (the fast getter,
    ``_SpectralNorm.forward``) are shared by every model, so compiles across tests would add up
    to Dynamo's recompile limit and fail a ``fullgraph=True`` test that is fine on its own."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    yield
