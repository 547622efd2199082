"""Random sequences of what users do with an SN layer, on PyTorch's and sn_fused's side by side.

``tests/test_parametrizations.py`` checks each use on its own. Here hypothesis' stateful
testing strings them together in random orders, which is where a layer's own state can go
stale: the checked-input signature it keeps between reads, its semaphore, the C++ read's
cached runners, u and v updated in place. One machine run builds a pair (``make_pair``: the
same module, u and v, PyTorch's SN on one copy and sn_fused's on the other, float64), then
applies a random sequence of

* reads in train and eval mode, under ``no_grad``, ``inference_mode`` and ``parametrize.cached``,
  through ``torch.func.functional_call`` (the model's tensors or copies), several before one
  backward (``D(real) - D(fake)``);
* backward, SGD steps with momentum, ``zero_grad``;
* new values of ``n_power_iterations`` and ``eps``;
* ``state_dict`` saved from one side and loaded into both;
* in-place edits of the weight, a new ``.data`` of other strides, ``channels_last`` and back;
* ``copy.deepcopy`` of both models (with new optimizers);

and after every step compares the outputs, the weights, every gradient and u, v. The same
file runs in all three modes of ``tests/run.sh`` (kernels with the C++ read, the fallback path,
the Python read). ``SN_FUSED_SLOW=1`` runs more and longer sequences; otherwise the sequences
are fixed (derandomized), as a CI must be.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.nn.utils import parametrize

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,  # noqa: E402
                                 rule)

from conftest import FORWARD_PATHS, forward_path  # noqa: E402
from test_parametrizations import VEC_TOL, assert_close, assert_uv_close, make_pair, orig, par  # noqa: E402

SLOW = os.environ.get("SN_FUSED_SLOW", "0") == "1"
DTYPE = torch.float64
#: Kinds whose weights go through the kernels (2-D or more): a Linear, a conv read along its
#: last dim, a ConvTranspose (dim=1), an Embedding.
KINDS = ["linear", "conv2d", "conv2d_dim-1", "convtranspose2d", "embedding"]

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


class SpectralNormUse(RuleBasedStateMachine):
    """One pair of models driven alike; ``self.pending``: reads not yet backpropagated."""

    @initialize(kind=st.sampled_from(KINDS), n=st.integers(1, 3), train=st.booleans(),
                path=st.sampled_from(list(FORWARD_PATHS)), seed=st.integers(0, 2**31 - 1))
    def build(self, kind, n, train, path, seed):
        """``path``: the kernels' read path (``conftest.forward_path``); these small weights
        would take ON_CHIP by default, so that the other paths run too."""
        self.kind = kind
        self._path = forward_path(path)
        self._path.__enter__()
        self.ref, self.ours, self.make_x = make_pair(kind, seed, dtype=DTYPE, n_power_iterations=n,
                                                     train=train)
        self.seed = seed
        self._new_optimizers()
        self.pending = []
        self._read()  # (the layer's checked read: what follows may take its fast path)

    def _new_optimizers(self):
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (self.ref, self.ours)]

    def _both(self, fn):
        return fn(self.ref), fn(self.ours)

    def _input(self):
        self.seed += 1
        torch.manual_seed(self.seed)
        return self.make_x()

    def _read(self, keep=True):
        x = self._input()
        y_ref, y_ours = self._both(lambda m: m(x))
        assert_close(y_ours, y_ref, msg=f"{self.kind}: outputs differ")
        if keep and y_ref.requires_grad:
            assert y_ours.requires_grad
            r = torch.randn(y_ref.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(self.seed))
            self.pending.append((y_ref, y_ours, r))

    # ------------------------------------------------------------------ reads

    @rule(context=st.sampled_from(["grad", "no_grad", "inference_mode", "cached"]))
    def read(self, context):
        """A read in the module's mode; ``cached``: two reads in one ``parametrize.cached()``
        block, which iterate once."""
        if context == "grad":
            self._read()
        elif context == "cached":
            with parametrize.cached():
                self._read()
                self._read()
        else:
            with torch.no_grad() if context == "no_grad" else torch.inference_mode():
                self._read(keep=False)

    @rule(copies=st.booleans())
    def read_functional_call(self, copies):
        """``torch.func.functional_call`` with the model's own tensors or with copies of them
        (a functional training loop's state): a training read updates the u, v it is given."""
        x = self._input()

        def call(m):
            state = {k: t.detach().clone() if copies else t for k, t in [*m.named_parameters(), *m.named_buffers()]}
            return torch.func.functional_call(m, state, (x,)), state

        (y_ref, state_ref), (y_ours, state_ours) = self._both(call)
        assert_close(y_ours, y_ref, msg=f"{self.kind}: outputs differ")
        for key in state_ref:
            if key.endswith(("._u", "._v")):
                assert_close(state_ours[key], state_ref[key], DTYPE, VEC_TOL, scale=False, msg=key)

    @rule(train=st.booleans())
    def set_training(self, train):
        self._both(lambda m: m.train(train))
        self._read()

    # ------------------------------------------------------------------ training

    @precondition(lambda self: self.pending)
    @rule()
    def backward(self):
        """Backpropagate the pending reads; where PyTorch raises (a weight edited in place since
        a read, e.g. by an optimizer step), sn_fused must raise the same error."""
        errors = []
        for side in (0, 1):
            loss = sum((p[side] * p[2]).sum() for p in self.pending)
            try:
                loss.backward()
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e).split(":")[0])
        self.pending = []
        assert errors[1] == errors[0], f"{self.kind}: PyTorch's backward raised {errors[0]!r}, ours {errors[1]!r}"

    @rule()
    def step(self):
        for opt in self.optimizers:
            opt.step()
        self._read()

    @rule()
    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ attributes, state
    # Each change is followed by a read, where state kept from before it would show.

    @rule(n=st.integers(1, 3))
    def set_n_power_iterations(self, n):
        self._both(lambda m: setattr(par(m), "n_power_iterations", n))
        self._read()

    @rule(eps=st.sampled_from([1e-12, 0.0, 1e-3, 2.0]))
    def set_eps(self, eps):
        """(2.0 is above ``||W v||`` of most of these weights: the clamp of ``normalize`` acts.)"""
        self._both(lambda m: setattr(par(m), "eps", eps))
        self._read()

    @rule(source=st.sampled_from(["ref", "ours"]))
    def load_state_dict(self, source):
        sd_ref, sd_ours = self._both(lambda m: m.state_dict())
        assert sd_ref.keys() == sd_ours.keys()
        sd = {k: v.clone() for k, v in (sd_ref if source == "ref" else sd_ours).items()}
        self._both(lambda m: m.load_state_dict(sd))
        self._read()

    @rule(scale=st.sampled_from([0.5, -2.0]))
    def scale_weight_in_place(self, scale):
        with torch.no_grad():
            self._both(lambda m: orig(m).mul_(scale))
        self._read()

    @rule()
    def new_data_of_other_strides(self):
        """``.data =`` a copy whose memory runs along the last dim first (e.g. a transposed
        Linear weight)."""
        def swap(m):
            w = orig(m).data
            w_t = w.transpose(0, -1).contiguous().transpose(0, -1)
            assert torch.equal(w_t, w)
            orig(m).data = w_t
        self._both(swap)
        self._new_optimizers()  # (SGD's momentum buffers keep the old strides: fine, but start anew)
        self._read()

    @precondition(lambda self: orig(self.ours).ndim == 4)
    @rule(channels_last=st.booleans())
    def memory_format(self, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._both(lambda m: m.to(memory_format=fmt))
        self._read()

    @rule()
    def deepcopy(self):
        # (pending reads hold the old models' graphs: backpropagate them first, as a user would)
        if self.pending:
            self.backward()
        self.ref, self.ours = self._both(copy.deepcopy)
        self._new_optimizers()
        self._read()

    def teardown(self):
        if hasattr(self, "_path"):
            self._path.__exit__(None, None, None)

    # ------------------------------------------------------------------ after every step

    @invariant()
    def same_state(self):
        # (hypothesis checks invariants only once build has run)
        assert_close(orig(self.ours), orig(self.ref), msg=f"{self.kind}: weights differ")
        assert_uv_close(self.ours, self.ref, DTYPE)
        for (name, p_ref), (_, p_ours) in zip(self.ref.named_parameters(), self.ours.named_parameters()):
            assert (p_ref.grad is None) == (p_ours.grad is None), name
            if p_ref.grad is not None:
                assert_close(p_ours.grad, p_ref.grad, msg=f"{self.kind}: gradient of {name} differs")


SpectralNormUse.TestCase.settings = settings(
    max_examples=300 if SLOW else 30, stateful_step_count=60 if SLOW else 25, deadline=None,
    derandomize=not SLOW, suppress_health_check=[HealthCheck.too_slow])
test_spectral_norm_use = SpectralNormUse.TestCase

