r"""``DistributedDataParallel`` (gloo, 2 CPU processes) over ``sn_fused.spectral_norm``.

A tiny SN discriminator (spectral norm on every layer) is trained for a few
SGD steps by 2 ranks, each on half of a fixed batch, and by one process on the
whole batch. What must hold, and why:

* **Ranks agree bitwise** (parameters, grads, ``_u``, ``_v``, ``_sigma``,
  ``_sem``): DDP starts every rank from rank 0's state and all-reduces the
  gradients, so every rank applies the same update; the power iteration
  ``u = normalize(A v); v = normalize(A^T u)`` depends on ``W`` and ``v``
  only, never on the batch, so it gives the same bits on every rank.
* **Ranks match the single-process run to rounding**: with mean-reduced
  losses, DDP's average of the two half-batch gradients is the full-batch
  gradient (u, v, sigma are the same on both ranks and the SN backward is
  linear in the incoming gradient); u and v see the same ``W`` and ``v``,
  and the same number of reads (one per forward per layer), as the single
  process, so they follow the same sequence.

Three set-ups run in the same two processes, two of DDP and one of FSDP2:

* DDP's defaults (``broadcast_buffers=True``): rank 1 builds its model from
  another seed (DDP's construction-time broadcast must replace its
  parameters AND its buffers, including the non-persistent float ``_sigma``
  and int32 ``_sem``), and between steps rank 1 scribbles over its own
  ``_u``/``_v``/``_sigma``/``_sem`` (``_sem`` to the barrier's other valid
  state): the broadcast of rank 0's buffers before the next forward must
  overwrite them before the kernels read them, or rank 1's ``v`` (hence u,
  sigma, its gradient and, through the all-reduce, everyone's weights)
  drifts. (Checked: the same scribbles without the broadcast do break both
  the bitwise and the single-process comparisons.)
* no buffer sync before the forwards (``broadcast_buffers=False``, or
  ``forward_sync_buffers=False`` where PyTorch has it): the ranks stay in
  step because they compute the same thing (both use seed 0 here: with
  ``broadcast_buffers=False`` DDP does not sync buffers at construction).
* ``fully_shard`` (FSDP2) on each SN layer and on the model: every rank
  holds its shard of each ``parametrizations.weight.original`` (a ``DTensor``,
  split along dim 0: the 1 x 32 Linear weight is all on rank 0) and
  all-gathers it before the layer's forward, so each read sees the whole
  weight as a plain tensor; the gradients are reduce-scattered (averaged), and
  buffers (u, v, sigma, the semaphore) stay each rank's own, never broadcast.
  Parameters and gradients are compared whole (``full_tensor()``).

The children run in whichever mode the parent imported sn_fused in
(``TRITON_INTERPRET=1``: the Triton kernels through the interpreter; else
the PyTorch reference path): the variable is passed on explicitly, and each
child checks its mode and reports which path its reads went through.

Children are plain ``sys.executable`` subprocesses running this file (like
``mp`` spawn, but independent of pytest's import mode, and with each child's
output captured for the failure message). Rendezvous: TCP on 127.0.0.1, at a
port found free at run time; gloo on the loopback interface. A child that
fails makes the test fail at once with its traceback; a child that hangs is
killed after ``TIMEOUT_S``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sn_fused
from sn_fused.parametrizations import _SpectralNorm

try:
    import torch.distributed as dist

    _GLOO = dist.is_available() and dist.is_gloo_available()
except Exception:  # pragma: no cover - builds without distributed support
    dist = None
    _GLOO = False

WORLD = 2
BATCH = 8  # 4 per rank
STEPS = 3
LR = 0.5
PERTURB_BEFORE_STEPS = (1, 2)  # rank 1 scribbles over its buffers before these steps
TIMEOUT_S = 120  # whole run, both children
PG_TIMEOUT_S = 60  # a collective waiting on a dead peer errors out after this
INT32_TOP_BIT = -(2**31)  # 0x80000000 as an int32: the grid barrier's other valid state
SCENARIOS = {
    # name: (broadcast_buffers, init seed of each rank)
    "broadcast_buffers": (True, (0, 1)),
    "local_buffers": (False, (0, 0)),
}
FSDP = "fully_shard"  # (FSDP2: torch.distributed.fsdp.fully_shard, torch >= 2.6)


# --------------------------------------------------------------------------- shared by both sides


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    sn = sn_fused.spectral_norm
    return nn.Sequential(
        sn(nn.Conv2d(3, 8, 3)),  # 8 x 27
        nn.LeakyReLU(0.2),
        sn(nn.Conv2d(8, 8, 3, stride=2), n_power_iterations=2),  # 8 x 72
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        sn(nn.Linear(8 * 2 * 2, 1)),  # 1 x 32
    )


def make_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(BATCH, 3, 8, 8, generator=g)


def sn_modules(model: nn.Module) -> list[_SpectralNorm]:
    return [m for m in model.modules() if isinstance(m, _SpectralNorm)]


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    # Non-saturating GAN loss on "real" data; mean-reduced so that DDP's
    # gradient average over equal shards is the full-batch gradient.
    return F.softplus(-out).mean()


def train(forward: nn.Module, model: nn.Module, x: torch.Tensor, before_step=None) -> dict:
    """``STEPS`` SGD steps (``forward`` may be the DDP wrapper of ``model``); then a snapshot."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        if before_step is not None:
            before_step(step)
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(x)).backward()
        opt.step()
    snap = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "state_dict_keys": sorted(model.state_dict().keys()),
    }
    model.eval()
    with torch.no_grad():
        snap["eval_out"] = forward(make_batch())
    model.train()
    return snap


def _fsdp2():
    """``fully_shard`` where this torch has it (FSDP2), else None."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return fully_shard


# --------------------------------------------------------------------------- child


def _ddp_buffer_kwargs(broadcast: bool) -> dict:
    """DDP's defaults (rank 0's buffers broadcast before each forward), or no forward sync.

    ``broadcast_buffers`` is deprecated in newer PyTorch in favour of
    ``forward_sync_buffers`` (which still syncs at construction: harmless
    here, both ranks use the same seed in that scenario).
    """
    if broadcast:
        return {}
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _worker(rank: int, world: int, port: int, out_dir: Path, expect_interpret: bool) -> None:
    torch.set_num_threads(1)  # 2 ranks on a small machine; also fixes the reduction order
    from sn_fused import parametrizations, reference

    # The mode must be the parent's: TRITON_INTERPRET is read at import.
    if sn_fused.ops.INTERPRET != expect_interpret:
        raise AssertionError(f"rank {rank}: sn_fused.ops.INTERPRET={sn_fused.ops.INTERPRET}, parent has "
                             f"{expect_interpret} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})")
    # Count which path the reads take (both are looked up at call time).
    counts = {"fused": 0, "reference": 0}
    fused, ref = parametrizations.spectral_norm_fused, reference.spectral_norm_reference

    def counting_fused(*a, **k):
        counts["fused"] += 1
        return fused(*a, **k)

    def counting_ref(*a, **k):
        counts["reference"] += 1
        return ref(*a, **k)

    parametrizations.spectral_norm_fused = counting_fused
    reference.spectral_norm_reference = counting_ref

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        shard = make_batch().chunk(world)[rank]
        results: dict = {"interpret": sn_fused.ops.INTERPRET}
        for name, (broadcast, seeds) in SCENARIOS.items():
            model = make_model(seeds[rank])
            ddp = torch.nn.parallel.DistributedDataParallel(model, **_ddp_buffer_kwargs(broadcast))
            sns = sn_modules(model)
            results.setdefault("fused_supported", [
                sn_fused.ops.fused_supported(m.parametrizations.weight.original)
                for m in model.modules() if hasattr(m, "parametrizations")])
            init = {n: b.clone() for n, b in model.named_buffers()}
            init.update({n: p.detach().clone() for n, p in model.named_parameters()})

            def scribble(step, sns=sns):
                if rank != 1 or step not in PERTURB_BEFORE_STEPS:
                    return
                g = torch.Generator().manual_seed(100 + step)
                with torch.no_grad():
                    for m in sns:
                        m._u.copy_(F.normalize(torch.randn(m._u.shape, generator=g), dim=0))
                        m._v.copy_(F.normalize(torch.randn(m._v.shape, generator=g), dim=0))
                        m._sigma.fill_(-123.0)
                        m._sem.bitwise_xor_(INT32_TOP_BIT)  # the barrier's other valid state

            snap = train(ddp, model, shard, scribble if broadcast else None)
            snap["init"] = init
            results[name] = snap
            dist.barrier()
        fully_shard = _fsdp2()
        if fully_shard is not None:
            model = make_model(0)
            for m in model.modules():
                if hasattr(m, "parametrizations"):
                    fully_shard(m)
            fully_shard(model)
            init = _whole({n: p.detach() for n, p in model.named_parameters()})
            init.update({n: b.clone() for n, b in model.named_buffers()})
            snap = train(model, model, shard)
            for part in ("params", "grads"):
                snap[part] = _whole(snap[part])
            snap["init"] = init
            results[FSDP] = snap
            dist.barrier()
        results["counts"] = counts
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _whole(tensors: dict) -> dict:
    """Sharded parameters (``DTensor``) gathered whole, in name order on every rank."""
    from torch.distributed.tensor import DTensor

    return {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in tensors.items()}


def _main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interpret", type=int, required=True)
    a = p.parse_args(argv)
    _worker(a.rank, a.world, a.port, a.out, bool(a.interpret))


if __name__ == "__main__":
    _main(sys.argv[1:])
    sys.exit(0)


# --------------------------------------------------------------------------- parent

import pytest  # noqa: E402  (children never import pytest)

pytestmark = pytest.mark.skipif(not _GLOO, reason="torch.distributed with the gloo backend is unavailable")
# Every set-up the children run (FSDP2's where this torch has it).
ALL_SCENARIOS = list(SCENARIOS) + ([FSDP] if _GLOO and _fsdp2() is not None else [])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The children run the same sn_fused as this process, in the same mode.
    root = str(Path(sn_fused.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [q for q in [env.get("PYTHONPATH")] if q])
    if sn_fused.ops.INTERPRET:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    if "GLOO_SOCKET_IFNAME" not in env:
        try:
            names = {n for _, n in socket.if_nameindex()}
        except (OSError, AttributeError):
            names = set()
        for lo in ("lo", "lo0"):
            if lo in names:  # localhost only, whatever the host name resolves to
                env["GLOO_SOCKET_IFNAME"] = lo
                break
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_children(out_dir: Path) -> list[dict]:
    port = _free_port()
    env = _child_env()
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            log = open(out_dir / f"rank{rank}.log", "w+b")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--rank", str(rank),
                 "--world", str(WORLD), "--port", str(port), "--out", str(out_dir),
                 "--interpret", str(int(sn_fused.ops.INTERPRET))],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + TIMEOUT_S
        failure = None
        while True:
            codes = [pr.poll() for pr in procs]
            if all(c == 0 for c in codes):
                break
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failure = f"rank(s) {bad} exited with code(s) {[codes[r] for r in bad]}"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S} s (exit codes so far: {codes})"
                break
            time.sleep(0.05)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
        for pr in procs:
            try:
                pr.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read().decode(errors="replace"))
            log.close()
    if failure is not None:
        report = "\n".join(f"----- rank {r} output -----\n{o[-6000:]}" for r, o in enumerate(outputs))
        pytest.fail(f"distributed children failed: {failure}\n{report}", pytrace=False)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory(prefix="sn_fused_ddp_") as d:
        yield _run_children(Path(d))


@pytest.fixture(scope="module")
def single_process():
    """The same training on the whole batch in this process (same mode, seed 0)."""
    model = make_model(0)
    init = {n: b.clone() for n, b in model.named_buffers()}
    init.update({n: p.detach().clone() for n, p in model.named_parameters()})
    snap = train(model, model, make_batch())
    snap["init"] = init
    return snap


def _assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs: {a[k]} vs {b[k]}"


# float32 through different batch splits / reduction orders: rounding only.
_TOL = dict(rtol=2e-5, atol=2e-6)


def test_children_ran_in_the_parents_mode(ddp_results):
    for rank, res in enumerate(ddp_results):
        assert res["interpret"] == sn_fused.ops.INTERPRET, rank
        counts = res["counts"]
        if sn_fused.ops.INTERPRET:
            assert all(res["fused_supported"]), res["fused_supported"]
            assert counts["fused"] > 0 and counts["reference"] == 0, (rank, counts)
        else:
            assert not any(res["fused_supported"]), res["fused_supported"]
            assert counts["fused"] == 0 and counts["reference"] > 0, (rank, counts)


@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
def test_ranks_agree_bitwise(ddp_results, scenario):
    r0, r1 = (res[scenario] for res in ddp_results)
    # Construction: with broadcast_buffers, rank 1's other-seed state (parameters and
    # buffers) is replaced by rank 0's; without, both ranks built the same state.
    _assert_bitwise(r0["init"], r1["init"], f"{scenario}: state after DDP construction")
    for part in ("params", "grads", "buffers"):
        _assert_bitwise(r0[part], r1[part], f"{scenario}: {part}")
    assert torch.equal(r0["eval_out"], r1["eval_out"])
    assert r0["state_dict_keys"] == r1["state_dict_keys"]


@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
def test_ranks_match_single_process(ddp_results, single_process, scenario):
    ref = single_process
    res = ddp_results[0][scenario]
    # Rank 0 built its model from seed 0, exactly like the single process.
    _assert_bitwise(res["init"], ref["init"], f"{scenario}: initial state")
    assert res["state_dict_keys"] == ref["state_dict_keys"]
    assert not any(k.endswith(("_sigma", "_sem")) for k in res["state_dict_keys"])
    for part in ("params", "grads"):
        assert res[part].keys() == ref[part].keys()
        for k in ref[part]:
            torch.testing.assert_close(res[part][k], ref[part][k], **_TOL, msg=lambda m: f"{part} {k}: {m}")
    assert res["buffers"].keys() == ref["buffers"].keys()
    for k, b in ref["buffers"].items():
        if k.endswith("_sem"):
            continue
        torch.testing.assert_close(res["buffers"][k], b, **_TOL, msg=lambda m: f"buffer {k}: {m}")
    torch.testing.assert_close(res["eval_out"], ref["eval_out"], **_TOL)
    # The training actually moved things (the comparison is not vacuous).
    for k, p in ref["params"].items():
        assert not torch.equal(p, ref["init"][k]), k
    for k, b in ref["buffers"].items():
        if k.endswith(("_u", "_v")) and b.numel() > 1:  # a 1-vector is +-1 for good
            assert not torch.equal(b, ref["init"][k]), k


@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
def test_semaphore_valid_after_distributed_training(ddp_results, single_process, scenario):
    """The semaphores after training, gloo's broadcasts of them included (DDP's scenarios)."""
    ref = single_process["buffers"]
    for rank, res in enumerate(ddp_results):
        bufs = res[scenario]["buffers"]
        for k, sem in bufs.items():
            if not k.endswith("_sem"):
                continue
            assert sem.dtype == torch.int32 and sem.shape == (2,) and sem.device.type == "cpu", (rank, k)
            # Valid barrier states only (0 or 0x80000000), and the same as after the
            # same sequence of launches in one process (rank 1's scribbles overwritten).
            assert all(int(s) in (0, INT32_TOP_BIT) for s in sem), (rank, k, sem)
            assert torch.equal(sem, ref[k]), (rank, k, sem, ref[k])
            if not sn_fused.ops.INTERPRET:
                assert torch.equal(sem, torch.zeros(2, dtype=torch.int32))  # never touched
