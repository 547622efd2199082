"""The kernels' single launch (``PHASE == -1``, grid barriers), run on a CPU by Triton's interpreter.

On a GPU a read is one launch whose programs meet at grid barriers. The interpreter runs a grid's
programs one after another, where a spin barrier of more than one program never returns, so the
CPU tests otherwise run the same source phase by phase (``PHASE = k``: launch boundaries for
barriers), and the single launch's own control flow -- which phase follows which barrier in one
program, what it loads after it -- ran only on a GPU.

Here each program of a launch runs on a thread of its own, one thread at a time (a token: the
interpreter is not thread-safe), and the token moves at a grid barrier (``kernels.grid_barrier``
replaced by a hand-over) or at a program's end, to a program chosen at random (seeded). So a
program may run ahead to its next barrier while others have not reached the last one, as on a GPU.
Every load and store of the launch's buffers is logged with its program and epoch (the barriers
that program has passed), and ``Recorder.findings`` lists what a GPU could get wrong:

  RAW     a program reads an element another program wrote in the same epoch (no barrier between)
  WAR     a program writes an element another program read in the same epoch
  WAW     two programs write an element in the same epoch
  L1      a plain load (not ``.cg``) of an element another program wrote earlier in the launch: it
          may hit a stale L1 line (``grid_barrier``'s docstring)
  UNINIT  a read of workspace no program has written in this launch
  HANG    programs pass different numbers of barriers, or one ends while others wait at one

What it cannot see: the GPU's memory model itself (release/acquire, ``.cg``: the PTX says that, and
``tests/test_compile_sm90.py`` reads it) and hazards between the threads of one program.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import threading
from dataclasses import dataclass

import numpy as np
from triton.runtime import interpreter

from sn_fused.ops import kernels
from sn_fused.ops import spectral_norm as snm

#: The kernels' buffers whose accesses are logged (their parameter names).
TRACKED = ("ws_ptr", "u_ptr", "v_ptr", "saved_ptr", "sigma_buf_ptr", "out_ptr", "dw_ptr")


@dataclass(frozen=True)
class Finding:
    kind: str  # RAW, WAR, WAW, L1, UNINIT, HANG
    buffer: str
    element: int
    program: int
    epoch: int


class _Buffer:
    """A tracked buffer: for each element, the last writer and its epoch, the last reader and its
    epoch, and the epoch in which a second program read it."""

    def __init__(self, name: str, tensor):
        self.name = name
        self.base = tensor.data_ptr()
        self.itemsize = tensor.element_size()
        n = tensor.untyped_storage().nbytes() // self.itemsize - tensor.storage_offset()
        self.end = self.base + n * self.itemsize
        self.writer, self.write_epoch, self.reader, self.read_epoch, self.shared_read_epoch = (
            np.full(n, -1, np.int64) for _ in range(5))


class Recorder:
    """The findings of the single launches run inside ``single_launch()``, and each launch's
    barrier count per program."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.findings: list[Finding] = []
        self.barriers: list[tuple[int, ...]] = []
        self._launched: dict = {}  # the tracked tensors of the launch being made, by parameter name
        self._buffers: list[_Buffer] = []
        self._grid: _Grid | None = None

    def _access(self, pointers, mask, write: bool, cg: bool) -> None:
        grid = self._grid
        if grid is None or grid.current is None:
            return
        p, e = grid.current, grid.epoch[grid.current]
        addresses = np.asarray(pointers).reshape(-1).astype(np.int64)
        addresses = addresses[np.broadcast_to(np.asarray(mask), np.asarray(pointers).shape).reshape(-1)]
        for b in self._buffers:
            inside = (addresses >= b.base) & (addresses < b.end)
            if not inside.any():
                continue
            i = np.unique((addresses[inside] - b.base) // b.itemsize)
            if write:
                self._flag("WAW", b, i[(b.write_epoch[i] == e) & (b.writer[i] != p)], p, e)
                self._flag("WAR", b, i[(b.read_epoch[i] == e)
                                       & ((b.reader[i] != p) | (b.shared_read_epoch[i] == e))], p, e)
                b.writer[i], b.write_epoch[i] = p, e
            else:
                self._flag("RAW", b, i[(b.write_epoch[i] == e) & (b.writer[i] != p)], p, e)
                if not cg:
                    self._flag("L1", b, i[(b.writer[i] >= 0) & (b.writer[i] != p) & (b.write_epoch[i] < e)], p, e)
                if b.name == "ws_ptr":
                    self._flag("UNINIT", b, i[b.writer[i] < 0], p, e)
                b.shared_read_epoch[i[(b.read_epoch[i] == e) & (b.reader[i] != p)]] = e
                b.reader[i], b.read_epoch[i] = p, e

    def _flag(self, kind, b: _Buffer, elements, p: int, e: int) -> None:
        if len(elements):
            self.findings.append(Finding(kind, b.name, int(elements[0]), p, e))


class _Grid:
    """One launch's programs on threads, one at a time; the token moves at barriers and ends."""

    def __init__(self, recorder: Recorder, G: int):
        self.recorder, self.G = recorder, G
        self.cond = threading.Condition()
        self.current: int | None = None
        self.epoch = [0] * G
        self.waiting: set[int] = set()
        self.live = set(range(G))
        self.ended_while_others_wait = False
        self.error: BaseException | None = None

    def _give(self, p: int) -> None:
        self.current = p
        interpreter.interpreter_builder.set_grid_idx(p, 0, 0)
        self.cond.notify_all()

    def _next(self) -> None:
        runnable = sorted(self.live - self.waiting)
        if runnable:
            self._give(self.recorder.rng.choice(runnable))
        elif not self.live:
            self.current = None
            self.cond.notify_all()
        else:  # every live program waits at a barrier: all of them pass it
            if len({self.epoch[q] for q in self.waiting}) != 1 or self.ended_while_others_wait:
                self.recorder.findings.append(Finding("HANG", "sem_ptr", -1, -1, max(self.epoch)))
            self.waiting.clear()
            self._give(self.recorder.rng.choice(sorted(self.live)))

    def barrier(self) -> None:
        with self.cond:
            p = self.current
            self.epoch[p] += 1
            self.waiting.add(p)
            self._next()
            while self.current != p:
                self.cond.wait()

    def run(self, fn, args: dict) -> None:
        def program(p: int) -> None:
            with self.cond:
                while self.current != p:
                    self.cond.wait()
            try:
                fn(**args)
            except BaseException as error:  # (raised again on the launching thread)
                self.error = error
            with self.cond:
                self.live.discard(p)
                self.waiting.discard(p)
                if self.waiting:
                    self.ended_while_others_wait = True
                self._next()

        threads = [threading.Thread(target=program, args=(p,), daemon=True) for p in range(self.G)]
        with self.cond:
            for t in threads:
                t.start()
            self._give(self.recorder.rng.randrange(self.G))
        for t in threads:
            t.join(600)
        if self.error is not None:
            raise self.error
        if len(set(self.epoch)) != 1:
            self.recorder.findings.append(Finding("HANG", "sem_ptr", -1, -1, max(self.epoch)))
        self.recorder.barriers.append(tuple(self.epoch))


class _ProgramsOnThreads:
    """Stands in for a kernel's function in the interpreter's loop over the grid
    (``GridExecutor``, which reads its signature, annotations and globals): the loop's first call
    runs every program of the grid on its own thread (``_Grid``); its other calls return at once."""

    def __init__(self, fn, recorder: Recorder):
        self.fn, self.recorder = fn, recorder
        self.__signature__ = inspect.signature(fn)
        self.__annotations__ = fn.__annotations__
        self.__globals__ = fn.__globals__
        self.__name__ = fn.__name__

    def __call__(self, **args):
        builder = interpreter.interpreter_builder
        G = builder.grid_dim[0]
        if G == 1:
            return self.fn(**args)
        if builder.grid_idx[0] != 0:
            return None
        recorder = self.recorder
        recorder._buffers = [_Buffer(name, t) for name, t in recorder._launched.items()]
        recorder._grid = _Grid(recorder, G)
        try:
            recorder._grid.run(self.fn, args)
        finally:
            recorder._grid = None


@contextlib.contextmanager
def single_launch(seed: int = 0):
    """Within: the launcher's launches of more than one program run as one launch (``PHASE ==
    -1``: call the ops with ``phase_by_phase=False``), programs on threads as above. Yields the
    ``Recorder``."""
    recorder = Recorder(seed)
    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    rewrite, launch_uncached, barrier = interpreter.InterpretedFunction.rewrite, snm._launch_uncached, kernels.grid_barrier
    kernel_fns = {kernels.spectral_norm_fwd_kernel.fn, kernels.spectral_norm_bwd_kernel.fn}

    # The builder's load takes (..., cache_modifier, eviction_policy, is_volatile) up to Triton 3.8,
    # and (..., cache_policy, is_volatile) from 3.9, whose interpreter makes every cache policy
    # None; there ``get_cache_policy`` below passes the modifier (".cg") through instead, so the
    # first argument after ``other`` names it either way.
    def masked_load(pointers, mask, other, cache, *rest):
        recorder._access(pointers.data, mask.data, False, "CG" in str(cache).upper())
        return load(pointers, mask, other, cache, *rest)

    def masked_store(pointers, value, mask, *cache):
        recorder._access(pointers.data, mask.data, True, False)
        return store(pointers, value, mask, *cache)

    cache_policy = getattr(builder, "get_cache_policy", None)  # (Triton >= 3.9)

    def rewritten(self):
        fn = rewrite(self)
        return _ProgramsOnThreads(fn, recorder) if self.fn in kernel_fns else fn

    def launch(kernel, grid, args, cfg, cooperative, key, out):
        # (the launcher refuses a cooperative launch of more than one program in the interpreter,
        # where it would deadlock; here it does not)
        names = inspect.signature(kernel.fn).parameters
        recorder._launched = {n: a for n, a in zip(names, args) if n in TRACKED}
        kernel[(grid,)](*args, **snm._launch_options(cfg, cooperative))

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    if cache_policy is not None:
        builder.get_cache_policy = lambda cache_modifier, eviction_policy: cache_modifier
    interpreter.InterpretedFunction.rewrite = rewritten
    snm._launch_uncached = launch
    kernels.grid_barrier = lambda sem_ptr: recorder._grid.barrier()
    try:
        yield recorder
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        if cache_policy is not None:
            del builder.get_cache_policy  # (the instance's own: the class's method shows again)
        interpreter.InterpretedFunction.rewrite = rewrite
        snm._launch_uncached = launch_uncached
        kernels.grid_barrier = barrier
