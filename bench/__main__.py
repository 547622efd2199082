"""``python -m bench``: the sn_fused benchmark suite.

    python -m bench --quick            # ~2 min on an H100, compile warm-ups included
    python -m bench                    # everything (see BENCHMARKS.md for the time it takes)
    python -m bench --out $OUT --shapes 4096x4096,biggan --dtypes bf16 --n 5

With CUDA: per-layer reads (eager and CUDA-graph), memory floors, kernel
launches, whole training steps; results printed and written to
``bench/results/<card>-<date>-<profile>.{json,md,png}`` (or ``--out``).

Without CUDA (CPU mode): checks the fused kernels in Triton's interpreter
against the float64 reference (in a child process started with
``TRITON_INTERPRET=1``, which must be set before Triton is imported), times
the CPU paths, and says that GPU numbers need a GPU. Files are written only
with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

# torch does not import triton eagerly, so the device can be probed before
# deciding whether Triton must run in its interpreter (sn_fused imports triton).
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """What a run measures."""

    name: str
    groups: tuple[str, ...]
    dtypes: tuple[str, ...]
    n_iters: tuple[int, ...]
    impls: tuple[str, ...]                 # on every shape
    compiled_impls: tuple[str, ...]        # only on compile_shapes
    compile_shapes: tuple[str, ...]
    compile_dtypes: tuple[str, ...]
    compile_n: tuple[int, ...]
    steps: tuple[tuple[str, str, tuple[int, ...]], ...]  # (model, mode, n values)
    launch_impls: tuple[str, ...]          # implementations whose kernel launches are counted
    eager_s: float
    rounds: int
    bench_warmup_ms: float
    bench_rep_ms: float
    step_s: float
    batch: int | None = None               # None: the model's benchmark batch
    step_rounds: int = 5
    step_warmup: int | None = None         # None: per mode (harness.WARMUP_STEPS)
    parts: tuple[str, ...] = ("layers", "steps")
    max_seconds: float | None = None       # stop starting new cases after this (None: never)
    notes: tuple[str, ...] = field(default=())


def _profiles() -> dict[str, Profile]:
    from . import shapes
    from .harness import IMPLS

    base_impls = ("torch_param", "sn_fused", "torch_legacy")  # torch_param first: the reference
    quick = Profile(
        name="quick", groups=shapes.QUICK_GROUPS, dtypes=("fp32",), n_iters=(1,), impls=base_impls,
        compiled_impls=("torch_compile",), compile_shapes=shapes.COMPILE_SHAPES_QUICK,
        compile_dtypes=("fp32",), compile_n=(1,),
        steps=(("sngan_resnet_d", "eager", (1,)), ("sngan_resnet_d", "compile", (1,)),
               ("sngan_resnet_d", "reduce-overhead", (1,)), ("biggan128_d", "eager", (1,))),
        launch_impls=("torch_param", "sn_fused"), max_seconds=160,
        eager_s=0.04, rounds=5, bench_warmup_ms=5, bench_rep_ms=25, step_s=0.3)
    full = Profile(
        name="full", groups=shapes.FULL_GROUPS, dtypes=("fp32", "bf16"), n_iters=(1, 5), impls=base_impls,
        compiled_impls=("torch_compile", "sn_fused_compile"), compile_shapes=shapes.COMPILE_SHAPES_FULL,
        compile_dtypes=("fp32",), compile_n=(1,),
        steps=tuple((m, mode, (1, 5) if mode == "eager" else (1,))
                    for m in ("sngan_resnet_d", "biggan128_d")
                    for mode in ("eager", "compile", "reduce-overhead")),
        launch_impls=tuple(IMPLS),
        eager_s=0.1, rounds=7, bench_warmup_ms=10, bench_rep_ms=60, step_s=1.0)
    cpu = Profile(
        name="cpu", groups=shapes.FULL_GROUPS, dtypes=("fp32",), n_iters=(1,), impls=base_impls,
        compiled_impls=(), compile_shapes=(), compile_dtypes=(), compile_n=(),
        steps=(("sngan_resnet_d", "eager", (1,)),), launch_impls=(), eager_s=0.02, rounds=5, bench_warmup_ms=0,
        bench_rep_ms=0, step_s=0.3, batch=2, step_rounds=3, step_warmup=1,
        notes=("CPU mode: sn_fused runs its pure-PyTorch reference path on CPU tensors (without "
               "TRITON_INTERPRET=1); CPU times are for reference (noisy on a shared machine), the SNGAN "
               "step at batch 2 is a smoke test of three steps (the GPU benchmark uses batch 64)",))
    return {"quick": quick, "full": full, "cpu": cpu}


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the ~2-minute GPU profile")
    ap.add_argument("--out", metavar="DIR", help="results directory (default bench/results; "
                    "CPU mode writes files only when given)")
    ap.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    ap.add_argument("--shapes", metavar="PATTERNS",
                    help="comma-separated filter: a shape (128x1152, 256x8192T), part of a "
                         "layer label ('conv2d(768'), or a group: sngan_resnet, sngan_cnn, "
                         "biggan128_d, biggan128_g, conv_transpose, large, table4")
    ap.add_argument("--dtypes", help="comma-separated, e.g. fp32,bf16 (default: the profile's)")
    ap.add_argument("--n", help="power iterations, comma-separated, e.g. 1,5 (default: the profile's)")
    ap.add_argument("--impls", help="comma-separated subset of torch_param,sn_fused,torch_legacy,"
                                    "torch_compile,sn_fused_compile")
    ap.add_argument("--parts", help="layers,steps (default both)")
    ap.add_argument("--models", help="steps: comma-separated subset of sngan_resnet_d,biggan128_d")
    ap.add_argument("--modes", help="steps: comma-separated subset of eager,compile,reduce-overhead")
    ap.add_argument("--graph-reads", type=int, default=1, metavar="K",
                    help="reads captured per CUDA graph; L2 is flushed before each replay, so "
                         "K=1 (default) times every read with a cold L2")
    ap.add_argument("--no-launches", action="store_true", help="skip the profiler launch counts")
    ap.add_argument("--max-seconds", type=float, metavar="S",
                    help="start no new case after S seconds; the rest are reported as skipped "
                         "(default: 160 with --quick, no limit otherwise; 0: no limit)")
    ap.add_argument("--smoke-suite", action="store_true",
                    help="developer check: run the GPU suite's code paths on CPU with tiny "
                         "budgets and batch 2 (numbers are meaningless)")
    ap.add_argument("--interpreter-check", metavar="JSON", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


def _check_names(kind: str, given: tuple[str, ...] | None, known) -> None:
    bad = [g for g in given or () if g not in known]
    if bad:
        raise SystemExit(f"unknown {kind} {', '.join(bad)}; known: {', '.join(known)}")


def _resolve_steps(p: Profile, args: argparse.Namespace, n_override: tuple[int, ...] | None):
    """The profile's (model, mode, n values), narrowed/widened by --models, --modes and --n."""
    from .harness import STEP_MODES
    from .models import MODELS

    models, modes = _csv(args.models), _csv(args.modes)
    _check_names("model", models, MODELS)
    _check_names("step mode", modes, STEP_MODES)
    planned = {(m, mode): ns for m, mode, ns in p.steps}
    models = models or tuple(dict.fromkeys(m for m, _mode, _ns in p.steps))
    steps = []
    for m in models:
        for mode in modes or [mode for (pm, mode) in planned if pm == m] or ["eager"]:
            steps.append((m, mode, n_override or planned.get((m, mode), (1,))))
    return tuple(steps)


def resolve_profile(args: argparse.Namespace, name: str) -> Profile:
    """A profile with the command-line filters applied."""
    from .harness import DTYPES, IMPLS

    p = _profiles()[name]
    dtypes, impls, parts = _csv(args.dtypes), _csv(args.impls), _csv(args.parts)
    n_iters = tuple(int(k) for k in _csv(args.n)) if args.n else None
    _check_names("dtype", dtypes, DTYPES)
    _check_names("implementation", impls, IMPLS)
    _check_names("part", parts, ("layers", "steps"))
    changes: dict[str, Any] = dict(steps=_resolve_steps(p, args, n_iters))
    if dtypes:
        changes.update(dtypes=dtypes, compile_dtypes=dtypes)
    if n_iters:
        changes.update(n_iters=n_iters, compile_n=n_iters)
    if impls:
        changes.update(impls=tuple(i for i in impls if not i.endswith("_compile")),
                       compiled_impls=tuple(i for i in impls if i.endswith("_compile")))
    if parts:
        changes["parts"] = parts
    if args.max_seconds is not None:
        changes["max_seconds"] = args.max_seconds or None
    return replace(p, **changes)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if device.index is None:  # torch.cuda.set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def environment(device: torch.device, profile: str) -> dict[str, Any]:
    import numpy
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    meta: dict[str, Any] = dict(
        date=now.strftime("%Y-%m-%d"), time_utc=now.strftime("%Y-%m-%dT%H:%M:%SZ"), profile=profile,
        python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
        numpy=numpy.__version__, cuda=torch.version.cuda, device=str(device),
        # SN_FUSED_COMMIT first: a copied tree (the lent GPU) may carry a stale .git.
        git_commit=os.environ.get("SN_FUSED_COMMIT") or _run(["git", "rev-parse", "HEAD"]) or "unknown",
        git_dirty=(None if os.environ.get("SN_FUSED_COMMIT")
                   else bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))),
        argv=sys.argv[1:], cpu_threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                    f"--id={device.index or 0}"])
        meta.update(card=props.name, sm_count=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", driver=smi or "unknown",
                    cudnn=torch.backends.cudnn.version(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        meta.update(card=f"cpu-{platform.machine()}", driver="n/a",
                    cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    return meta


# --------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log, or no tqdm) one line per finished case."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.text, self.t0 = total, 0, "", time.perf_counter()
        self.bar = None
        try:
            from tqdm import tqdm
        except ImportError:
            print("note: tqdm is not installed, no progress bar (one line per case instead)")
            return
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, dynamic_ncols=True, unit="case", file=sys.stderr)

    def describe(self, text: str) -> None:
        self.text, self.t0 = text, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str(text[:60])

    def advance(self, status: str | None = None, result: str = "") -> None:
        """``result``: the case's headline number, printed at once so a killed run keeps it."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if result:
                self.bar.write(f"{self.text}: {result}")
        else:
            status = status or f"{time.perf_counter() - self.t0:.1f} s"
            print(f"[{self.done}/{self.total}] {self.text} ({status}){': ' + result if result else ''}",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- suite


def layer_cases(profile: Profile, shape_filter: str | None) -> list[tuple]:
    """``(layer, dtype name, n, impl)`` in run order (PyTorch first in each group)."""
    from . import shapes

    out = []
    for layer in shapes.select(profile.groups, shape_filter):
        for dtype in profile.dtypes:
            for n in profile.n_iters:
                impls = list(profile.impls)
                if layer.name in profile.compile_shapes and dtype in profile.compile_dtypes \
                        and n in profile.compile_n:
                    impls += profile.compiled_impls
                out += [(layer, dtype, n, impl) for impl in impls]
    return out


def step_cases(profile: Profile) -> list[tuple[str, str, str, int]]:
    """``(model, mode, sn, n)``: the no-SN step once per (model, mode), then each n."""
    out = []
    for model, mode, ns in profile.steps:
        out.append((model, mode, "none", ns[0]))
        out += [(model, mode, sn, n) for n in ns for sn in ("torch_param", "sn_fused")]
    return out


def _start_case(progress: Progress, name: str, deadline: float | None, skipped: list[str] | None) -> bool:
    """Show the case; False (and listed as skipped) once the --max-seconds deadline has passed."""
    progress.describe(name)
    if deadline is None or time.perf_counter() <= deadline:
        return True
    skipped.append(name)
    progress.advance("skipped: --max-seconds")
    return False


def run_layers(cases: list[tuple], device: torch.device, budget, bandwidth: float | None,
               progress: Progress, launch_impls: tuple[str, ...] = (),
               deadline: float | None = None, skipped: list[str] | None = None) -> list[dict]:
    """Measure every case (PyTorch's first read is the reference of the others in its group)."""
    from . import harness

    rows: list[dict] = []
    reference: dict[tuple, torch.Tensor] = {}
    for layer, dtype, n, impl in cases:
        if not _start_case(progress, f"{layer.name} {dtype} n={n} {impl}", deadline, skipped):
            continue
        key = (layer.name, dtype, n)
        if reference and key not in reference:  # a new case: drop the old reference output
            reference.clear()
            harness.release_memory(device)
        compiled = impl.endswith("_compile")
        if compiled:
            harness.reset_compiler()
        try:
            bench = harness.build_layer(layer, impl, dtype=harness.DTYPES[dtype], device=device,
                                        n_power_iterations=n)
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            rows.append(dict(shape=layer.name, label=layer.label, groups=list(layer.groups), M=layer.M,
                             N=layer.N, numel=layer.numel, dtype=dtype, n=n, impl=impl,
                             errors={"build": harness.error_text(exc)}))
            progress.advance()
            continue
        ref = reference.get(key) if impl not in ("torch_param", "torch_legacy") else None
        b = budget if impl in launch_impls else replace(budget, launches=False)
        row, first_out = harness.measure_layer(bench, device, b, bandwidth, ref)
        if impl == "torch_param" and first_out is not None:
            reference[key] = first_out
        rows.append(row)
        del bench, first_out
        if compiled:
            harness.reset_compiler()
        progress.advance()
    reference.clear()
    harness.release_memory(device)
    return rows


def run_steps(cases: list[tuple], device: torch.device, budget, batch: int | None,
              progress: Progress, deadline: float | None = None,
              skipped: list[str] | None = None) -> list[dict]:
    """Training steps, one group per (model, mode): each case is built and warmed up (its
    own fresh model), then the group's steps are timed together, in interleaved rounds."""
    from . import harness

    rows = []
    for (model, mode), group in itertools.groupby(cases, key=lambda c: (c[0], c[1])):
        if mode != "eager":
            harness.reset_compiler()
        ready: list[tuple] = []
        for _, _, sn, n in group:
            if not _start_case(progress, f"step {model} {mode} {sn} n={n}", deadline, skipped):
                continue
            try:
                bench = harness.build_step(model, sn, mode, device, n_power_iterations=n, batch=batch)
                row = harness.warm_up_step(bench, device, budget)
            except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
                bench, row = None, dict(model=model, sn=sn, mode=mode, n=n, batch=batch,
                                        error=harness.error_text(exc))
            rows.append(row)
            if "error" not in row:
                ready.append((bench, row))
            else:  # e.g. out of memory: free it before the next case of the group is built
                bench = None
                harness.release_memory(device)
            progress.advance(result=row["error"] if "error" in row else f"warm-up {row['warmup_s']:.1f} s")
        if ready:
            harness.time_steps([b for b, _ in ready], [r for _, r in ready], device, budget)
            timing = "interleaved" if all(r.get("timing") == "interleaved" for _, r in ready) else "each alone"
            print(f"step {model} {mode}, ms/step ({timing}): " + ", ".join(
                f"{r['sn']} n={r['n']} {r['step_ms']:.2f}" if "step_ms" in r else f"{r['sn']} n={r['n']} error"
                for _, r in ready), flush=True)
        ready, bench = [], None  # drop the group's models before the next group
        if mode != "eager":
            harness.reset_compiler()
        harness.release_memory(device)
    return rows


def make_budget(profile: Profile, args: argparse.Namespace, device: torch.device):
    from .harness import Budget

    return Budget(eager_s=profile.eager_s, rounds=profile.rounds, bench_warmup_ms=profile.bench_warmup_ms,
                  bench_rep_ms=profile.bench_rep_ms, graph_reads=max(1, args.graph_reads),
                  step_s=profile.step_s, step_rounds=profile.step_rounds, step_warmup=profile.step_warmup,
                  launches=device.type == "cuda" and not args.no_launches)


def run_suite(args: argparse.Namespace, device: torch.device, profile: Profile) -> dict[str, Any]:
    """Layers and steps on ``device``; returns the results dict (printed and written by the caller)."""
    from . import harness

    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results: dict[str, Any] = dict(meta=environment(device, profile.name), notes=list(profile.notes),
                                   section_seconds={})
    budget = make_budget(profile, args, device)
    results["budget"] = dataclasses.asdict(budget)
    results["profile"] = dataclasses.asdict(profile)
    l_cases = layer_cases(profile, args.shapes) if "layers" in profile.parts else []
    s_cases = step_cases(profile) if "steps" in profile.parts else []
    if device.type != "cuda":
        s_cases = [c for c in s_cases if c[1] != "reduce-overhead"]  # CUDA graphs only
    print("\n".join(_header(results)), flush=True)
    t0 = time.perf_counter()
    results["copy_bandwidth_Bps"] = harness.copy_bandwidth(device)
    results["section_seconds"]["copy_bandwidth"] = time.perf_counter() - t0
    print(f"copy bandwidth (read + write): {results['copy_bandwidth_Bps'] / 1e9:.0f} GB/s; "
          f"{len(l_cases)} layer cases, {len(s_cases)} step cases", flush=True)
    deadline = t_start + profile.max_seconds if profile.max_seconds else None
    skipped: list[str] = []
    progress = Progress(len(l_cases) + len(s_cases))
    try:
        t0 = time.perf_counter()
        results["layers"] = run_layers(l_cases, device, budget, results["copy_bandwidth_Bps"], progress,
                                       profile.launch_impls, deadline, skipped)
        results["section_seconds"]["layers"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["steps"] = run_steps(s_cases, device, budget, profile.batch, progress, deadline, skipped)
        results["section_seconds"]["steps"] = time.perf_counter() - t0
    finally:
        progress.close()
    if skipped:
        results["skipped"] = skipped
        results["notes"].append(f"{len(skipped)} case(s) not run: the {profile.max_seconds:.0f} s "
                                f"limit (--max-seconds) was reached: {', '.join(skipped)}")
    results["section_seconds"]["total"] = time.perf_counter() - t_start
    return results


def _header(results: dict) -> list[str]:
    from .report import environment_lines

    return ["== sn_fused benchmark", *environment_lines(results)]


def print_results(results: dict) -> None:
    from . import report

    print()
    for table in report.tables(results, detail=False):
        print(report.format_text(table))
        print()
    for note in results.get("notes", []):
        print(f"note: {note}")
    errors = report.error_lines(results)
    if errors:
        print(f"{len(errors)} measurement(s) failed (also in the .md/.json):")
        for line in errors:
            print(f"  {line}")
        print()


def write_results(results: dict, out_dir: str) -> None:
    from . import report

    meta = results["meta"]
    stem = report.output_stem(out_dir, meta["card"], meta["date"], meta["profile"])
    for path in report.write_outputs(results, stem):
        print(f"wrote {os.path.relpath(path)}")


# --------------------------------------------------------------------------- CPU mode


def _start_interpreter_check(json_path: str) -> subprocess.Popen:
    """``python -m bench --interpreter-check`` in a child with TRITON_INTERPRET=1 from the start."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "bench", "--interpreter-check", json_path],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish_interpreter_check(proc: subprocess.Popen, json_path: str, timeout: float = 600) -> dict:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return dict(ok=False, summary=f"timed out after {timeout:.0f} s", cases=[], output=output[-4000:])
    try:
        with open(json_path) as f:
            check = json.load(f)
    except (OSError, ValueError):
        return dict(ok=False, summary=f"the check process failed (exit {proc.returncode})", cases=[],
                    output=output[-4000:])
    finally:
        if os.path.exists(json_path):
            os.remove(json_path)
    return check


def interpreter_check_main(json_path: str) -> int:
    from . import harness, host_time, interpreter_check

    check = interpreter_check.run()
    try:  # in the same child: CPU weights take the fused path only under the interpreter
        check["host_time"] = host_time.measure()
    except Exception as exc:  # noqa: BLE001 -- reported, does not fail the check
        check["host_time"] = dict(error=harness.error_text(exc))
    with open(json_path, "w") as f:
        json.dump(check, f)
    return 0 if check["ok"] else 1


CPU_STEP_DEADLINE_S = 60  # CPU mode must end within ~2 minutes even on a busy 2-core machine


def run_cpu_mode(args: argparse.Namespace, device: torch.device) -> int:
    t_start = time.perf_counter()
    print("== sn_fused benchmark: CPU mode (no CUDA device)")
    print("GPU numbers need a GPU: run `python -m bench --quick` (or `python -m bench`) on a CUDA "
          "machine. Here: kernel correctness in Triton's interpreter, and the CPU paths timed.")
    in_process = os.environ.get("TRITON_INTERPRET") == "1"
    proc = json_path = None
    if not in_process:  # started first: its imports overlap with ours
        fd, json_path = tempfile.mkstemp(prefix="sn_fused_check_", suffix=".json")
        os.close(fd)
        proc = _start_interpreter_check(json_path)

    from . import interpreter_check  # imports sn_fused (and triton)

    profile = resolve_profile(args, "cpu")
    notes = list(profile.notes)
    impls = profile.impls
    if in_process:
        notes.append("TRITON_INTERPRET=1 was set: sn_fused's CPU timings (they would time the "
                     "interpreter) are skipped, per layer and in the training step")
        impls = tuple(i for i in impls if i != "sn_fused")
    t0 = time.perf_counter()
    check = interpreter_check.run() if in_process else _finish_interpreter_check(proc, json_path)
    check_s = time.perf_counter() - t0
    for line in interpreter_check.format_lines(check) if check.get("cases") else [check["summary"]]:
        print(line)
    if check.get("output") and not check["ok"]:
        print(check["output"])
    if "host_time" in check:
        from . import host_time

        for line in host_time.format_lines(check["host_time"]):
            print(line)

    from . import shapes

    profile = replace(profile, impls=impls, groups=shapes.FULL_GROUPS)
    shape_filter = args.shapes or ",".join(shapes.CPU_SHAPES)
    results: dict[str, Any] = dict(meta=environment(device, "cpu"), notes=notes, interpreter_check=check,
                                   section_seconds={"interpreter_check": check_s})
    budget = make_budget(profile, args, device)
    l_cases = layer_cases(profile, shape_filter) if "layers" in profile.parts else []
    s_cases = step_cases(profile) if "steps" in profile.parts else []
    if in_process:
        s_cases = [case for case in s_cases if case[2] != "sn_fused"]
    threads = torch.get_num_threads()
    notes.append(f"per-layer CPU timings run on one thread (stable on a shared machine); "
                 f"the step uses {threads}")
    progress = Progress(len(l_cases) + len(s_cases))
    try:
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        try:
            results["layers"] = run_layers(l_cases, device, budget, None, progress)
        finally:
            torch.set_num_threads(threads)
        results["section_seconds"]["layers"] = time.perf_counter() - t0
        if s_cases and time.perf_counter() - t_start > CPU_STEP_DEADLINE_S:
            notes.append(f"training-step smoke test skipped: {CPU_STEP_DEADLINE_S} s already spent "
                         "(a loaded machine); run `python -m bench --device cpu --parts steps` for it")
            s_cases = []
        t0 = time.perf_counter()
        results["steps"] = run_steps(s_cases, device, budget, profile.batch, progress)
        results["section_seconds"]["steps"] = time.perf_counter() - t0
    finally:
        progress.close()
    results["section_seconds"]["total"] = time.perf_counter() - t_start
    print_results(results)
    if args.out:
        write_results(results, args.out)
    print(f"CPU mode done in {results['section_seconds']['total']:.0f} s. "
          f"{'Kernel check passed.' if check['ok'] else 'KERNEL CHECK FAILED.'} "
          "GPU timings need a CUDA GPU: `python -m bench --quick`.")
    return 0 if check["ok"] else 1


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpreter_check:
        return interpreter_check_main(args.interpreter_check)
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.smoke_suite:
        return run_cpu_mode(args, device)
    profile = resolve_profile(args, "quick" if args.quick or args.smoke_suite else "full")
    if args.smoke_suite:
        from . import shapes

        steps = profile.steps if args.models else tuple(s for s in profile.steps if s[0] == "sngan_resnet_d")
        profile = replace(profile, name=f"smoke-{device.type}", batch=2, eager_s=0.005, rounds=2,
                          step_s=0.05, step_rounds=2, steps=steps, max_seconds=args.max_seconds or None,
                          groups=shapes.FULL_GROUPS if args.shapes else ("sngan_resnet",),
                          notes=("smoke suite: code paths only, the numbers are meaningless",))
    results = run_suite(args, device, profile)
    print_results(results)
    out_dir = args.out or os.path.join(REPO_ROOT, "bench", "results")
    if device.type == "cuda" or args.out:
        write_results(results, out_dir)
    print(f"done in {results['section_seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
