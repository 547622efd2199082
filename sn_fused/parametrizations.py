r"""``sn_fused.spectral_norm``: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

Same registration (``torch.nn.utils.parametrize``), same buffers (``_u``,
``_v``), same initialisation (u drawn before v from the global generator,
15 warm-up iterations), same state_dict keys, same errors. The difference is
the read: on CUDA (and on CPU under ``TRITON_INTERPRET=1``) one Triton launch
does the power iteration, sigma and the rescale, and one more does the
backward. Elsewhere (CPU, complex weights, u or v the kernels cannot take) the pure-PyTorch
reference runs.
"""

from __future__ import annotations

import math
import numbers
import operator
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.nn import Module
from torch.fx import _symbolic_trace as _fx_symbolic_trace
from torch.nn.modules import module as _module_mod
from torch.nn.utils import parametrize

from . import reference
from .ops import fused_supported, new_semaphore, spectral_norm_fused
from .ops import spectral_norm as _ops
from .ops.spectral_norm import (_check_in_place_update, _is_semaphore, _plain_tensor, _read_signature,
                                _spectral_norm_checked, _vectors_error)

__all__ = ["spectral_norm", "_SpectralNorm"]

# Guards the first assignment of a layer's _sem_stream and _stream_sems (_stream_semaphore).
_SEM_STREAM_LOCK = threading.Lock()
_MAX_STREAM_SEMS = 256  # semaphores of other streams a layer keeps


def _new_sigma_buffer(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The last-sigma logging buffer before any read: NaN (no sigma computed yet).

    ``weight.new_full``: on the weight's device, and of its type where that is a tensor
    subclass (a ``TwoTensor`` weight logs both of its sigmas). A normal tensor even when made
    inside ``torch.inference_mode()``, as ``_new_layer_semaphore``'s: an inference tensor
    would refuse the reference path's in-place logging after the block."""
    with torch.inference_mode(False):
        return weight.new_full((), float("nan"), dtype=dtype)


def _new_layer_semaphore(device: torch.device) -> Tensor:
    """``new_semaphore(device)`` for a layer's ``_sem``: a normal tensor even when made inside
    ``torch.inference_mode()`` (a layer made, deep-copied or moved there). The layer's own
    buffers outlive the block, and an inference tensor has no version counter, by which the
    layer sees torch code writing into its semaphore. (PyTorch's ``_u``, ``_v`` stay as torch
    makes them, as in PyTorch's SN.)"""
    with torch.inference_mode(False):
        return new_semaphore(device)


def _op_arguments(n_power_iterations, eps) -> tuple:
    """``n_power_iterations`` and ``eps`` as the fused op takes them (an ``int``, a ``float``),
    from whatever PyTorch's SN reads as such: numpy scalars, one-element tensors, a bool count
    (its ``range(n)`` and ``clamp_min(eps)``). What ``range`` refuses raises its TypeError, as
    in PyTorch, and a negative count runs no iteration there: 0 here. The op's checks see to
    the rest (a non-finite eps)."""
    if type(n_power_iterations) is not int:
        n_power_iterations = operator.index(n_power_iterations)
    if n_power_iterations < 0:
        n_power_iterations = 0
    if not isinstance(eps, (float, torch.SymFloat)) and _real_scalar(eps):
        eps = float(eps)
    return n_power_iterations, eps


def _check_eps(eps) -> None:
    """Refuse an ``eps`` that PyTorch's SN would take but that silently gives NaN/Inf weights
    (negative or not finite), and one that is no real number (``TypeError``, which PyTorch's
    ``clamp_min`` raises at the first read), before anything runs. Any real number as
    ``clamp_min`` takes it: Python and numpy scalars, a one-element real tensor."""
    if not _real_scalar(eps):
        raise TypeError(f"Expected eps to be a real number, but got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Expected eps to be a finite non-negative number, but got eps={eps}")


def _real_scalar(x) -> bool:
    """A real number as PyTorch's ``clamp_min`` takes one: a Python or numpy scalar, or a
    one-element tensor that is not complex."""
    return isinstance(x, numbers.Real) or (isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex())


class _SpectralNorm(Module):
    r"""Parametrization ``W -> W / sigma(W)``; ``sigma`` by power iteration.

    Buffers:

    * ``_u`` (M), ``_v`` (N): the power-iteration vectors, updated in place in
      training mode (persistent: same keys as PyTorch's).
    * ``_sigma``: the last sigma, for logging without a host sync
      (non-persistent, so state_dict keys stay PyTorch's). Written by the
      kernel itself, no extra launch.
    * ``_sem``: the grid-barrier semaphores of this parametrization's
      kernels (non-persistent). One per module, so two modules running at
      the same time on two streams never share one; eager reads of this one
      on another CUDA stream take semaphores of their own
      (``_stream_semaphore``). Zeroed again after ``to()``, ``to_empty()``
      and the like (``_apply``).
    """

    #: ``(_read_signature(...), (dim in [0, ndim), n_power_iterations, eps), prepared,
    #: u or v an inference tensor)`` of the last read whose inputs passed the fused path's checks,
    #: with the op's arguments made from them (``_op_arguments``); reads whose inputs its
    #: signature ``matches`` skip both (but for training reads of inference u, v outside
    #: ``torch.inference_mode()``, which the checks refuse). ``prepared``: ``[eval, training]``,
    #: where the C++ read keeps its prepared launches for these inputs (``_spectral_norm_checked``).
    #: A class attribute, so instances made without ``__init__`` (``sn_fused.convert``) start
    #: unchecked too, and so do copies (``__getstate__``).
    _checked_read = None
    #: ``_sem._version`` when this layer last made the semaphore or put it at rest. The kernels'
    #: own writes leave the version alone, so any other version means torch code wrote into
    #: it -- AveragedModel(use_buffers=True) averaging every buffer, a cast, a fill -- and the
    #: grid barrier's invariant (0 or 0x80000000 at rest) may no longer hold: the next read
    #: zeroes it in place (a rest state; a new one if it is no longer an int32[2]). None
    #: (instances made by ``convert``): not known, zeroed once.
    _sem_version = None
    #: The CUDA stream (``cudaStream_t`` as an int) whose eager reads use ``_sem``: the first
    #: that read this layer since it was made or moved; ``_stream_sems``: ``{(device index,
    #: stream): semaphore}`` of the eager reads on any other (``_stream_semaphore``). Class
    #: attributes, as ``_checked_read``: instances made without ``__init__`` and copies start
    #: without (a copy's reads are its own).
    _sem_stream = None
    _stream_sems = None

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(
                "Dimension out of range (expected to be in range of "
                f"[-{ndim}, {ndim - 1}] but got {dim})"
            )
        if n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        _check_eps(eps)
        if weight.dtype in (torch.bool,) or not (weight.is_floating_point() or weight.is_complex()):
            # A RuntimeError, as PyTorch's SN raises for such a weight (from its first norm or its
            # normal_: NotImplementedError is one), with a message that says what is wrong.
            raise RuntimeError(f"spectral_norm expects a floating point or complex weight, got {weight.dtype}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        if ndim > 1:
            # For ndim == 1 we do not need to approximate anything (see forward)
            self.n_power_iterations = n_power_iterations
            weight_mat = reference.reshape_weight_to_matrix(weight, self.dim)
            h, w = weight_mat.size()

            # Same draws, same order as PyTorch: same seed, same u and v.
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            self.register_buffer("_sigma", _new_sigma_buffer(weight, weight.real.dtype),
                                 persistent=False)
            self.register_buffer("_sem", _new_layer_semaphore(weight.device), persistent=False)
            self._sem_version = self._sem._version

            # Start with u, v initialized to some reasonable values by performing a number
            # of iterations of the power method
            reference.power_method_(weight_mat, self._u, self._v, 15, self.eps)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            # Faster and more exact path, no need to approximate anything
            return F.normalize(weight, dim=0, eps=self.eps)
        if (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
                or torch._C._get_tracing_state() is not None):
            # torch.func (grad, vmap, jacrev, functional_call per-sample gradients),
            # forward-mode AD (dual tensors), eager or compiled, and torch.jit.trace: the
            # kernels' autograd.Function has no functorch rules and no jvp, and the JIT tracer
            # records torch ops only, while torch's ops behave there exactly as PyTorch's SN
            # does (and fail where it fails).
            return self._reference_read(weight, transformed=True)
        # Buffers straight from the dict: Module.__getattr__ costs ~1 us per name on this hot
        # path (every read of module.weight), the dict lookup ~0.1 us.
        buffers = self._buffers
        u, v, sigma_buf, sem = buffers["_u"], buffers["_v"], buffers["_sigma"], buffers["_sem"]
        dim, n_power_iterations, eps = self.dim, self.n_power_iterations, self.eps
        compiling = torch.compiler.is_compiling()  # traced once: checks cost nothing at run time
        if compiling and not (isinstance(n_power_iterations, int) and isinstance(eps, (int, float))):
            # A count or eps that is a numpy scalar or a tensor, which PyTorch's SN takes: Dynamo
            # traces those as arrays and tensors, which the op's int and float arguments cannot
            # take (eager reads make numbers of them, _op_arguments).
            return self._reference_read(weight)
        if not compiling:
            checked = self._checked_read
            if checked is not None and checked[0].matches(weight, u, v, sigma_buf, sem, dim, n_power_iterations,
                                                          eps):
                index = weight.get_device()  # (an int: -1 on a CPU, where the interpreter runs)
                launch_sem = sem if index < 0 else self._stream_semaphore(sem, weight, index)
                at_rest = True  # (another stream's own semaphore: only its reads write it)
                if launch_sem is sem:
                    try:
                        at_rest = sem._version == self._sem_version
                    except RuntimeError:  # an inference tensor has no version (see below)
                        at_rest = False
                # (u or v an inference tensor, checked[3]: a training read outside inference mode
                # would write it, which the checks refuse with torch's error)
                if at_rest and not (checked[3] and self.training and not torch.is_inference_mode_enabled()):
                    return _spectral_norm_checked(weight, u, v, sigma_buf, launch_sem, *checked[1],
                                                  self.training, checked[2])
            # None where a buffer is not a tensor: the checks below say so.
            signature = _read_signature(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps)
            if self._normal_own_buffers():
                sigma_buf, sem = buffers["_sigma"], buffers["_sem"]
        if fused_supported(weight, dim) and _vectors_error(weight, u, v, dim % weight.ndim) is None:
            # The two non-persistent buffers do not come with load_state_dict(assign=True): when
            # the weight arrives on another device, they are made anew there, and so when a plain
            # weight replaces a wrapper-subclass one (DTensor, TwoTensor); the semaphore is put
            # at rest when torch code wrote into it (see _sem_version). (Anything else wrong with them
            # is for the op's checks to say: an AttributeError here would surface as "no
            # attribute 'weight'", parametrize's property being a property.)
            # The semaphore this read launches with: _sem, or one of this stream's own. The
            # signature below keeps _sem, which the checks above looked at.
            launch_sem = sem
            if not compiling and isinstance(sem, Tensor):
                index = weight.get_device()  # (as on the checked path)
                if index >= 0:
                    launch_sem = self._stream_semaphore(sem, weight, index)
            remade = False
            if isinstance(sem, Tensor) and launch_sem is sem:
                # (Only where this read uses _sem: written or replaced from another stream, it
                # could change under a launch of _sem's stream. Reads there see to it: the checked
                # read finds _sem not at rest and comes here.)
                remade = sem.device != weight.device or not _plain_tensor(sem)
                if not remade and not compiling and sem._version != self._sem_version:  # written by torch code
                    # Put at rest where it is if it still is a semaphore: the same tensor keeps its
                    # address, which a compiled graph (CUDA graphs: a static input) and the checked
                    # read's signature hold. (Also after a compiled read of this layer, which bumps
                    # the version: its op declares the semaphore written.)
                    remade = not _is_semaphore(sem, weight.device)
                    if not remade:
                        with torch.no_grad():
                            sem.zero_()
                if remade:
                    sem = launch_sem = buffers["_sem"] = _new_layer_semaphore(weight.device)
                if not compiling:
                    self._sem_version = sem._version
            if isinstance(sigma_buf, Tensor) and (sigma_buf.device != weight.device
                                                  or not _plain_tensor(sigma_buf)):
                sigma_buf = buffers["_sigma"] = _new_sigma_buffer(weight, sigma_buf.dtype)
                remade = True
            n_arg, eps_arg = _op_arguments(n_power_iterations, eps)
            weight_sn = spectral_norm_fused(
                weight, u, v, sigma_buf, launch_sem, dim=dim, n_power_iterations=n_arg, eps=eps_arg,
                training=self.training,
                weight_checked=True)  # fused_supported just said yes: do not check the weight twice
            if not (compiling or signature is None or isinstance(n_power_iterations, Tensor)
                    or isinstance(eps, Tensor)):  # (a tensor can change in place: its value is not kept)
                # These inputs passed every check (the signature taken before them, so a change
                # made meanwhile by another thread is checked next time): skip them while it holds.
                if remade:
                    signature = _read_signature(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps)
                self._checked_read = (signature, (dim % weight.ndim, n_arg, eps_arg), [None, None],
                                      u.is_inference() or v.is_inference())
            return weight_sn
        # Also u or v the kernels cannot take (not contiguous, resized, replaced, of another dtype
        # or device): PyTorch's ops do with it what PyTorch's SN does, resize it with torch's
        # warning or raise torch's error.
        return self._reference_read(weight)

    def _stream_semaphore(self, sem: Tensor, weight: Tensor, device_index: int) -> Tensor:
        """The semaphore for an eager read of ``weight`` (on CUDA device ``device_index``) on
        the current stream: ``sem`` (``_sem``) on ``_sem_stream``, the first stream that read
        this layer outside a capture, and in a CUDA-graph capture; on any other stream, one of
        this layer's own for that stream.

        A grid barrier works only while no other grid uses its semaphore
        (``kernels.grid_barrier``). Launches on one stream run one after another, but launches
        on two may overlap: two threads reading one layer, each on its own stream, which
        PyTorch's SN allows (its eval read writes nothing, and its training read's races on
        u and v leave W_sn a normalized weight). Sharing one semaphore, their barriers would
        count each other's programs: a program could leave a barrier before its own grid has
        arrived (a wrong sigma, without a word) or wait for arrivals that never come (a hang;
        seen on an H200 with two streams' reads of 128x1152 made to overlap, bench/NOTES.md
        v24). A backward uses its read's semaphore (``sem[1]``) and runs on its read's stream.
        Of the reads, only those that use ``_sem`` write or replace it (``forward``'s fix-ups).

        A capture keeps ``sem``: the graph's launches then use the semaphore of the reads on
        ``_sem_stream``, so replaying it there is safe, and nothing is allocated (a new
        semaphore's zeros would be a memset node in the graph). Compiled code reads ``_sem`` as
        a buffer. So ``torch.compile``'d or captured reads of one layer must not run at once
        with each other or with eager reads on ``_sem_stream`` on another stream (README).
        """
        stream = _ops._raw_stream(device_index)
        home = self._sem_stream
        if stream == home:
            return sem
        if _ops._stream_capturing(device_index):
            return sem
        if sem.get_device() != device_index:
            # The weight came to another device without _apply (load_state_dict(assign=True)):
            # as a move, _sem is for forward to make anew there, and streams start anew.
            self._forget_streams()
            return sem
        if home is None:
            with _SEM_STREAM_LOCK:  # two threads' first reads: one of them takes _sem
                if self._sem_stream is None:
                    self._sem_stream = stream
            if stream == self._sem_stream:
                return sem
        sems = self._stream_sems
        if sems is None:
            with _SEM_STREAM_LOCK:
                if self._stream_sems is None:
                    self._stream_sems = {}
            sems = self._stream_sems
        key = (device_index, stream)
        own = sems.get(key)
        if own is None:
            if len(sems) >= _MAX_STREAM_SEMS:
                # A bound, not a policy (torch.cuda.Stream() hands out pooled streams, 32 per
                # priority per device). A freed semaphore's memory goes only to later allocations
                # of its own stream, so after that stream's pending launches.
                sems.clear()
            # Made on this stream (its zeros come before the read's launch) and kept: the stream
            # serializes this layer's reads on it.
            own = sems.setdefault(key, _new_layer_semaphore(weight.device))
        return own

    def _forget_streams(self) -> None:
        """After a move: the stream that reads first, and the other streams' semaphores, start
        anew on the new device (the class attributes' None). A semaphore freed here goes only to
        later allocations of its own stream, so after that stream's launches of it."""
        self.__dict__.pop("_sem_stream", None)
        self.__dict__.pop("_stream_sems", None)

    def _reference_read(self, weight: Tensor, transformed: bool = False) -> Tensor:
        """The read as torch ops (``reference.spectral_norm_reference``), where the kernels
        cannot run or must not (``transformed``: under torch.func or forward-mode AD; there
        ``_sigma`` is not written under ``torch.compile``, whose tracing of the transforms
        has no way around their refusal of the write)."""
        buffers = self._buffers
        if self.training:
            # torch raises for u, v that are inference tensors outside inference mode too, but
            # only after its F.normalize(..., out=u) has written u: here nothing is written. (Not
            # where its loop runs no iteration; a count range() refuses raises as there.)
            n = self.n_power_iterations
            if isinstance(n, int) and n > 0:
                _check_in_place_update(buffers["_u"], buffers["_v"])
            # PyTorch's _power_method, assignments included: ``self._u = F.normalize(..., out=self._u)``
            # gives back the same tensors (resized where they did not fit), or new ones for None.
            u, v = reference.power_method_(reference.reshape_weight_to_matrix(weight, self.dim),
                                           buffers["_u"], buffers["_v"], self.n_power_iterations, self.eps)
            if u is not buffers["_u"] or v is not buffers["_v"]:
                self._u, self._v = u, v
        weight_sn, sigma = reference.spectral_norm_reference(
            weight, buffers["_u"], buffers["_v"], dim=self.dim, eps=self.eps, training=False)
        sigma = sigma.real if sigma.is_complex() else sigma
        if not transformed:
            with torch.no_grad():
                buffers["_sigma"].copy_(sigma)
            return weight_sn
        sigma = None if torch.compiler.is_compiling() else _unwrap_functorch(sigma.detach())
        if sigma is not None:
            # Outside torch.func's view, as torch's own printing of a transformed tensor does: a
            # grad transform refuses any in-place write to a tensor it did not wrap.
            with torch.no_grad(), torch._C._DisableFuncTorch():
                buffers["_sigma"].copy_(sigma)
        return weight_sn

    def _apply(self, fn, recurse=True):
        # Module.to(), .cuda(), .half(), ... and to_empty() all come here. to_empty() (after a
        # meta-device init) gives every buffer uninitialized memory; PyTorch's u, v then wait
        # for the user's init, but the semaphore is ours, and the grid barrier's invariant
        # (the semaphore is 0 or 0x80000000 at rest) would not hold: a multi-program launch
        # could leave a barrier early, a wrong result without a word. Zero is a rest state,
        # so writing it into a new semaphore is safe (kernels on the stream come before it).
        before = self._buffers.get("_sem")
        super()._apply(fn, recurse)
        self._normal_own_buffers()  # (inside inference_mode, _apply makes inference tensors)
        sem = self._buffers.get("_sem")
        if not isinstance(sem, Tensor) or not isinstance(before, Tensor) or sem.device != before.device:
            # Moved. Not on a cast (.float(), .half()): another thread's stream may still have
            # launches of _sem queued, and another stream taking it meanwhile would share it.
            self._forget_streams()
        if isinstance(sem, Tensor) and sem is not before:
            # (The same tensor, which casts leave an int32 buffer as, is not written here: from
            # this stream, a zero could land inside another stream's launch of it. Whatever fn
            # wrote into it in place, its version says, and a read on its stream puts it right.)
            if _plain_tensor(sem) and sem.dtype == torch.int32:
                with torch.no_grad():
                    sem.zero_()
            else:  # Module.type() casts integer buffers too
                sem = self._buffers["_sem"] = _new_layer_semaphore(sem.device)
            self._sem_version = sem._version
        return self

    def __getstate__(self):
        # A copy or a pickle (deepcopy, torch.save of the module) checks its inputs again on its
        # first read: the checked read's signature may be a C++ object (_C.ReadSignature), which
        # neither copies nor pickles, and its prepared launches belong to this layer.
        state = super().__getstate__()
        state.pop("_checked_read", None)
        state.pop("_sem_stream", None)  # (and the semaphores of other streams: the copy's reads are its own)
        state.pop("_stream_sems", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # (a pickle of an earlier sn_fused may hold one, in the form of its day)
        self.__dict__.pop("_checked_read", None)

    def _normal_own_buffers(self) -> bool:
        """Make ``_sem`` and ``_sigma`` normal tensors again where torch code made them inference
        tensors (``deepcopy`` or ``to()`` inside ``torch.inference_mode()``); whether it did.

        An inference tensor has no version counter (``_sem_version``) and refuses in-place
        writes after the block (the reference path's logging of sigma). The semaphore is made
        anew, at rest; sigma keeps its value. Not while Dynamo traces (as the checks of
        ``_sem_version``: host state, which eager reads see to)."""
        if torch.compiler.is_compiling():
            return False
        buffers = self._buffers
        sem, sigma_buf = buffers.get("_sem"), buffers.get("_sigma")
        remade = False
        if isinstance(sem, Tensor) and sem.is_inference():
            sem = buffers["_sem"] = _new_layer_semaphore(sem.device)
            self._sem_version = sem._version
            remade = True
        if isinstance(sigma_buf, Tensor) and sigma_buf.is_inference():
            with torch.inference_mode(False):
                buffers["_sigma"] = sigma_buf.clone()
            remade = True
        return remade

    def right_inverse(self, value: Tensor) -> Tensor:
        # we may want to assert here that the passed value already
        # satisfies constraints
        return value


def _unwrap_functorch(t: Tensor) -> Tensor | None:
    """``t``'s value outside any ``torch.func`` transform, to log it into a buffer; None under
    ``vmap`` with ``t`` batched (one value per vmapped weight: nothing to log)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return None
        t = functorch.get_unwrapped(t)
    return t


# What the fast read (``_install_fast_read``) asks of torch's private state: what ``parametrize``'s
# getter and ``Module.__call__`` would see. These are not torch's API and have moved between
# releases, so they are looked up once, here: where the installed torch lacks one, the fast read
# is not installed and torch's own getter runs (the same numbers, ~15 us more host time per read
# on a CPU), instead of every read failing inside the property -- which Python reports as
# "object has no attribute 'weight'".
#
# torch.fx's "symbolic_trace is running" flag, read without ``is_fx_tracing()``'s log warning: a
# module global up to torch 2.13, a thread-local behind ``_get_is_fx_tracing()`` from 2.14.
if hasattr(_fx_symbolic_trace, "_get_is_fx_tracing"):
    _is_fx_tracing = _fx_symbolic_trace._get_is_fx_tracing
elif hasattr(_fx_symbolic_trace, "_is_fx_tracing_flag"):
    def _is_fx_tracing() -> bool:
        return _fx_symbolic_trace._is_fx_tracing_flag
else:
    _is_fx_tracing = None

_MODULE_STATE = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_compiled_call_impl")  # what ``_calls_forward`` reads of a module
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
# The private names the fast read needs that this torch lacks (empty: it is installed).
_FAST_READ_MISSING = tuple(
    ["torch.fx._symbolic_trace's fx tracing flag"] * (_is_fx_tracing is None)
    + [f"torch.nn.utils.parametrize.{a}" for a in ("_cache_enabled",) if not hasattr(parametrize, a)]
    + [f"torch.nn.modules.module.{a}" for a in _GLOBAL_HOOKS if not hasattr(_module_mod, a)]
    + [f"torch._C.{a}" for a in ("_get_tracing_state",) if not hasattr(torch._C, a)]
    + [f"Module().{a}" for a in _MODULE_STATE if not hasattr(Module(), a)])


def _calls_forward(module: Module) -> bool:
    """Whether ``module(*args)`` is just ``module.forward(*args)`` of the class's forward: no hooks
    of its own, not ``compile()``-d, no ``forward`` set on the instance (accelerate's hooks
    wrap it so). What ``Module.__call__`` checks; global hooks and tracing are checked apart."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module._compiled_call_impl is not None
                or "forward" in module.__dict__)


def _install_fast_read(module: Module, name: str) -> None:
    """Give the parametrized ``module.<name>`` a getter that calls the parametrization directly.

    torch's getter (``parametrize``'s ``get_parametrized``, then ``ParametrizationList.forward``
    through ``Module.__call__``) costs ~15 us of host time per read on a CPU, about as much
    as the rest of an sn_fused read: a ModuleDict and two ModuleList lookups, two
    ``Module.__call__``, and a ``hasattr`` that raises AttributeError to find the end of
    the chain. Where the list holds a single parametrization of a single tensor and nothing
    could tell the difference -- no hooks on the list or the parametrization, no global
    module hooks, no ``forward`` replaced on the list (accelerate's offloading hooks), nothing
    ``compile()``-d, no ``torch.jit.trace``, no FX tracing (``symbolic_trace`` must record the
    list as a module call, not the weight as a constant), no ``parametrize.cached()`` block --
    the read is what those calls come down to: ``plist[0].forward(plist.original)``. In every
    other case torch's getter runs, so stacked parametrizations, hooks, caching and tracing
    behave exactly as in PyTorch. (``ParametrizationList``'s own methods are taken to be
    torch's: the tests patch them to count the calls.)

    The property goes on the class ``register_parametrization`` made for this module (its
    deep copies share it: the getter reads whichever parametrization their list holds);
    ``remove_parametrizations`` deletes it like torch's. The setter stays torch's.
    """
    if _FAST_READ_MISSING:
        return  # this torch moved what the fast read asks (see above): torch's getter stays
    cls = type(module)
    prop = cls.__dict__.get(name)
    if not isinstance(prop, property) or getattr(prop.fget, "_sn_fused_torch_getter", None) is not None:
        return  # not parametrize's property (left alone), or ours already
    torch_getter = prop.fget

    def get_parametrized(self) -> Tensor:
        plist = self._modules["parametrizations"]._modules[name]
        original = plist._parameters.get("original")  # None: several originals, or a buffer
        if (original is not None and len(plist._modules) == 1 and not parametrize._cache_enabled
                and not (_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks
                         or _module_mod._global_backward_hooks or _module_mod._global_backward_pre_hooks)
                and torch._C._get_tracing_state() is None
                and not _is_fx_tracing()
                and _calls_forward(plist)):
            parametrization = plist._modules["0"]
            if _calls_forward(parametrization):
                return parametrization.forward(original)
            return parametrization(original)  # its own hooks run, as under torch's getter
        return torch_getter(self)

    get_parametrized._sn_fused_torch_getter = torch_getter
    setattr(cls, name, property(get_parametrized, prop.fset))


def spectral_norm(module: Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: int | None = None) -> Module:
    r"""Apply spectral normalization to a parameter in the given module.

    .. math::
        \mathbf{W}_{SN} = \dfrac{\mathbf{W}}{\sigma(\mathbf{W})},
        \sigma(\mathbf{W}) = \max_{\mathbf{h}: \mathbf{h} \ne 0} \dfrac{\|\mathbf{W} \mathbf{h}\|_2}{\|\mathbf{h}\|_2}

    A drop-in for :func:`torch.nn.utils.parametrizations.spectral_norm`: same
    arguments, defaults, errors, buffers, state_dict keys and numbers (to
    floating-point rounding). Each read of ``module.<name>`` in training mode
    runs ``n_power_iterations`` of the power method; on CUDA the whole read is
    one Triton kernel launch and its backward one more.

    Args:
        module (nn.Module): containing module
        name (str, optional): name of weight parameter. Default: ``"weight"``.
        n_power_iterations (int, optional): number of power iterations to
            calculate spectral norm. Default: ``1``.
        eps (float, optional): epsilon for numerical stability in
            calculating norms. Default: ``1e-12``.
        dim (int, optional): dimension corresponding to number of outputs.
            Default: ``0``, except for modules that are instances of
            ConvTranspose{1,2,3}d, when it is ``1``

    Returns:
        The original module with a new parametrization registered to the specified
        weight. The last sigma is in
        ``module.parametrizations.<name>[0]._sigma`` (no host sync to read it
        on the device).

    Example::

        >>> snm = sn_fused.spectral_norm(nn.Linear(20, 40))
        >>> torch.linalg.matrix_norm(snm.weight, 2)
        tensor(1.0081, grad_fn=<AmaxBackward0>)
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")

    if dim is None:
        if isinstance(module, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                               torch.nn.ConvTranspose3d)):
            dim = 1
        else:
            dim = 0
    parametrize.register_parametrization(module, name, _SpectralNorm(weight, n_power_iterations, dim, eps))
    _install_fast_read(module, name)
    return module
