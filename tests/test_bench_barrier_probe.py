"""``bench/barrier_probe.py`` (what one grid barrier costs, timed on a GPU by ``bench/gpu_check.sh``):
its rounds compute what the check expects (through the interpreter, one program: a barrier of
more would deadlock there), the check sees a launch that skips a round, and the GPU path's report
runs on CPU with the device stubbed."""

from __future__ import annotations

import pytest
import torch

from conftest import fused_device_or_skip, run_module_on_cpu

device = fused_device_or_skip()


def test_rounds_give_the_expected_values():
    from bench import barrier_probe

    assert barrier_probe.check(device) == 2 * len(barrier_probe.ROUNDS)


def test_a_skipped_round_fails_the_check(monkeypatch):
    from bench import barrier_probe

    launch = barrier_probe.launch
    monkeypatch.setattr(barrier_probe, "launch", lambda G, R, *args: launch(G, max(R - 1, 0), *args))
    with pytest.raises(AssertionError):
        barrier_probe.check(device)


def test_wrong_names_what_is_off():
    """After a launch: the last launch's values, the in-kernel count of wrong rounds (of any
    launch: the interpreter's one program cannot make one, so it is set here), the semaphore."""
    from bench import barrier_probe

    sem, part, out, err = barrier_probe.buffers(1, device)
    barrier_probe.launch(1, 2, True, sem, part, out, err)
    assert barrier_probe.wrong(1, 2, sem, out, err) is None and err.item() == 0
    barrier_probe.launch(1, 3, True, sem, part, out, err)  # (R = 3 where the check expects 2)
    assert barrier_probe.wrong(1, 2, sem, out, err).startswith("values")
    barrier_probe.launch(1, 2, True, sem, part, out, err)
    err.fill_(2)
    assert barrier_probe.wrong(1, 2, sem, out, err) == "2 wrong rounds"
    err.zero_()
    sem[0] = 1
    assert barrier_probe.wrong(1, 2, sem, out, err).startswith("semaphore")


def test_gpu_report(monkeypatch, capsys):
    from bench import barrier_probe, kernel_sweep

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stub")
    times = iter([1.0, 2.0, 9.0, 33.0] * 2)

    def graph_time_us(fn):
        fn()
        return next(times)

    monkeypatch.setattr(kernel_sweep, "graph_time_us", graph_time_us)
    monkeypatch.setattr(barrier_probe, "DEVICE", device)
    results = barrier_probe.probe([1])
    out = capsys.readouterr().out
    assert "WRONG" not in out
    assert [r["kind"] for r in results] == ["barrier", "round"]
    assert all(r["per_round_us"] == pytest.approx(1.0) for r in results)  # (33 - 1) / 32
    assert out.count("per barrier: 1.00 us") == 1 and out.count("per round: 1.00 us") == 1


def test_gpu_report_goes_on_past_a_refused_grid(monkeypatch, capsys):
    """A grid the card refuses (the cooperative launch's error) is reported and the next timed."""
    from bench import barrier_probe, kernel_sweep

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stub")
    calls = []

    def graph_time_us(fn):
        calls.append(fn)
        if len(calls) == 1:
            raise RuntimeError("cooperative launch too large\nmore")
        fn()
        return 1.0

    monkeypatch.setattr(kernel_sweep, "graph_time_us", graph_time_us)
    monkeypatch.setattr(barrier_probe, "DEVICE", device)
    results = barrier_probe.probe([1])
    out = capsys.readouterr().out
    assert "failed: RuntimeError: cooperative launch too large" in out
    assert [r["kind"] for r in results] == ["round"] and "WRONG" not in out


def test_main_without_a_gpu_says_what_it_checked():
    if device != "cpu":
        pytest.skip("the CPU mode of the entry point")
    out = run_module_on_cpu("bench.barrier_probe")
    assert "the times need a GPU" in out and "checked 8 launches" in out


@pytest.mark.parametrize("module", ["bench.barrier_probe", "bench.stream_probe"])
def test_probes_without_the_interpreter_say_so(module):
    """On a CPU without ``TRITON_INTERPRET=1`` (Triton has no driver for CPU tensors) the probes
    say what they need instead of failing in Triton's driver lookup."""
    if torch.cuda.is_available():
        pytest.skip("a GPU: the probes time")
    out = run_module_on_cpu(module, interpret=False)
    assert "TRITON_INTERPRET=1 not set: nothing checked" in out
