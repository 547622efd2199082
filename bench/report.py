"""Turn result rows into tables (printed and markdown), JSON and a plot.

One set of table builders feeds both the terminal and the ``.md`` file, so the
two never disagree. matplotlib is optional: without it there is no PNG.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from .harness import IMPL_LABELS, finite
from .shapes import TABLES

__all__ = ["environment_lines", "layer_summary", "model_totals", "step_table", "detail_table",
           "error_lines", "format_text", "format_markdown", "write_outputs", "output_stem"]

Table = tuple[str, list[str], list[list[str]]]  # (title, headers, rows)


# --------------------------------------------------------------------------- cells


def _us(x: Any) -> str:
    if not finite(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _ratio(num: Any, den: Any) -> str:
    return f"{num / den:.2f}x" if finite(num) and finite(den) and den > 0 else "-"


def _pct(x: Any) -> str:
    return f"{x:.0f}%" if finite(x) else "-"


def _count(x: Any) -> str:
    if not finite(x):
        return "-"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _launches(row: dict | None) -> str:
    if not row or not finite(row.get("launches_fwd")):
        return "-"
    return f"{_count(row['launches_fwd'])}+{_count(row.get('launches_bwd'))}"


# --------------------------------------------------------------------------- tables


def _by_case(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """``(shape, dtype, n) -> {impl: row}``, in first-seen order."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["shape"], row["dtype"], row["n"]), {})[row["impl"]] = row
    return cases


def _drop_empty_columns(headers: list[str], rows: list[list[str]], keep: int = 3) -> tuple[list, list]:
    cols = [i for i in range(len(headers))
            if i < keep or any(r[i] not in ("", "-") for r in rows)]
    return [headers[i] for i in cols], [[r[i] for i in cols] for r in rows]


def layer_summary(rows: list[dict]) -> Table:
    """One line per (shape, dtype, n): sn_fused against PyTorch, µs, speedup, % of floor."""
    headers = ["shape", "dtype", "n", "floor fwd",
               "graph fwd SNF", "graph fwd PT", "x", "SNF %floor",
               "eager fwd SNF", "eager fwd PT", "x", "eager fwd legacy", "eager fwd compile",
               "graph f+b SNF", "graph f+b PT", "x", "SNF %floor",
               "eager f+b SNF", "eager f+b PT", "x",
               "launches SNF", "launches PT"]
    out = []
    for (shape, dtype, n), impls in _by_case(rows).items():
        s, p = impls.get("sn_fused", {}), impls.get("torch_param", {})
        legacy, comp = impls.get("torch_legacy", {}), impls.get("torch_compile", {})
        floor = s.get("floor_fwd_us", p.get("floor_fwd_us"))
        out.append([
            shape, dtype, str(n), _us(floor),
            _us(s.get("graph_fwd_us")), _us(p.get("graph_fwd_us")),
            _ratio(p.get("graph_fwd_us"), s.get("graph_fwd_us")), _pct(s.get("pct_floor_graph_fwd")),
            _us(s.get("eager_fwd_us")), _us(p.get("eager_fwd_us")),
            _ratio(p.get("eager_fwd_us"), s.get("eager_fwd_us")),
            _us(legacy.get("eager_fwd_us")), _us(comp.get("eager_fwd_us")),
            _us(s.get("graph_fwdbwd_us")), _us(p.get("graph_fwdbwd_us")),
            _ratio(p.get("graph_fwdbwd_us"), s.get("graph_fwdbwd_us")),
            _pct(s.get("pct_floor_graph_fwdbwd")),
            _us(s.get("eager_fwdbwd_us")), _us(p.get("eager_fwdbwd_us")),
            _ratio(p.get("eager_fwdbwd_us"), s.get("eager_fwdbwd_us")),
            _launches(s), _launches(p),
        ])
    headers, out = _drop_empty_columns(headers, out)
    return ("Per layer, µs per read (SNF = sn_fused, PT = PyTorch parametrization; "
            "x = PT time / SNF time; floor = memory floor)", headers, out)


def detail_table(rows: list[dict]) -> Table:
    """Every implementation of every case (markdown only: it is long)."""
    headers = ["shape", "layer", "dtype", "n", "impl", "eager fwd", "eager f+b", "graph fwd",
               "graph f+b", "%floor fwd", "%floor f+b", "launches", "rel err vs PT", "warm-up s"]
    out = []
    for row in rows:
        err = row.get("rel_err_vs_torch")
        out.append([
            row["shape"], row["label"], row["dtype"], str(row["n"]), IMPL_LABELS.get(row["impl"], row["impl"]),
            _us(row.get("eager_fwd_us")), _us(row.get("eager_fwdbwd_us")),
            _us(row.get("graph_fwd_us")), _us(row.get("graph_fwdbwd_us")),
            _pct(row.get("pct_floor_graph_fwd")), _pct(row.get("pct_floor_graph_fwdbwd")),
            _launches(row), "-" if err is None else f"{err:.1e}",
            f"{row['warmup_s']:.2f}" if finite(row.get("warmup_s")) else "-",
        ])
    headers, out = _drop_empty_columns(headers, out, keep=5)
    return "All measurements (µs)", headers, out


def model_totals(rows: list[dict]) -> Table | None:
    """Sum over a model's normalized tensors (with multiplicity) of the per-read times."""
    cases = _by_case(rows)
    metrics = ("graph_fwd_us", "eager_fwd_us", "graph_fwdbwd_us", "eager_fwdbwd_us")
    headers = ["model", "tensors", "dtype", "n"]
    for m in ("graph fwd", "eager fwd", "graph f+b", "eager f+b"):
        headers += [f"{m} SNF", f"{m} PT", "x"]
    out = []
    dtype_n = list(dict.fromkeys((d, n) for (_s, d, n) in cases))
    for model in ("sngan_resnet", "sngan_cnn", "biggan128_d", "biggan128_g"):
        for dtype, n in dtype_n:
            members = [(layer.name, count) for layer, count in TABLES[model]]
            if not all((name, dtype, n) in cases for name, _ in members):
                continue
            line = [model, str(sum(c for _, c in members)), dtype, str(n)]
            for metric in metrics:
                tot = {}
                for impl in ("sn_fused", "torch_param"):
                    vals = [cases[(name, dtype, n)].get(impl, {}).get(metric) for name, _ in members]
                    tot[impl] = (sum(v * c for v, (_, c) in zip(vals, members))
                                 if all(finite(v) for v in vals) else None)
                line += [_us(tot["sn_fused"]), _us(tot["torch_param"]),
                         _ratio(tot["torch_param"], tot["sn_fused"])]
            out.append(line)
    if not out:
        return None
    headers, out = _drop_empty_columns(headers, out, keep=4)
    return "Per model: every normalized tensor read once (µs, sum over the model's tensors)", headers, out


def step_table(rows: list[dict]) -> Table | None:
    """Training steps: ms per step and spectral norm's overhead over the no-SN step (same mode)."""
    if not rows:
        return None
    base = {(r["model"], r["mode"]): r for r in rows if r["sn"] == "none"}
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["sn"] != "none":
            groups.setdefault((r["model"], r["mode"], r["n"]), {})[r["sn"]] = r
    for key, r in base.items():  # a mode measured without any SN variant still shows
        if not any(k[:2] == key for k in groups):
            groups[(*key, r["n"])] = {}
    headers = ["model", "batch", "mode", "n", "no SN ms", "PyTorch SN ms", "overhead", "sn_fused ms",
               "overhead", "warm-up s (none/PT/SNF)"]
    out = []

    def ms(r: dict | None) -> str:
        if not r:
            return "-"
        return f"{r['step_ms']:.2f}" if finite(r.get("step_ms")) else "error"

    def overhead(r: dict | None, b: dict | None) -> str:
        if r and b and finite(r.get("step_ms")) and finite(b.get("step_ms")):
            return f"{100 * (r['step_ms'] / b['step_ms'] - 1):+.0f}%"
        return "-"

    for (model, mode, n), variants in groups.items():
        b, p, s = base.get((model, mode)), variants.get("torch_param"), variants.get("sn_fused")
        warm = "/".join(f"{r['warmup_s']:.1f}" if r and finite(r.get("warmup_s")) else "-" for r in (b, p, s))
        batch = next((str(r["batch"]) for r in (b, p, s) if r), "-")
        out.append([model, batch, mode, str(n), ms(b), ms(p), overhead(p, b), ms(s), overhead(s, b), warm])
    return ("Training step (D: hinge loss fwd + bwd + Adam), ms per step, host-inclusive; "
            "overhead = vs no SN in the same mode", headers, out)


#: largest relative difference from PyTorch's first read that is not flagged (by dtype)
MATCH_TOLERANCE = {"fp64": 1e-10, "fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def error_lines(results: dict) -> list[str]:
    """Failed measurements, and implementations whose output differs from PyTorch's."""
    lines = []
    for row in results.get("layers", []):
        for key, msg in row.get("errors", {}).items():
            lines.append(f"{row['shape']} {row['dtype']} n={row['n']} {row['impl']} {key}: {msg}")
        err, tol = row.get("rel_err_vs_torch"), MATCH_TOLERANCE.get(row["dtype"], 1e-4)
        if err is not None and not err <= tol:  # (NaN: a NaN first read, where PyTorch's was finite)
            lines.append(f"{row['shape']} {row['dtype']} n={row['n']} {row['impl']}: first read differs "
                         f"from PyTorch's by {err:.1e} (relative, > {tol:g})")
    for row in results.get("steps", []):
        if row.get("error"):
            lines.append(f"step {row['model']} {row['mode']} {row['sn']} n={row['n']}: {row['error']}")
    for check in results.get("interpreter_check", {}).get("cases", []):
        if not check.get("ok"):
            lines.append(f"interpreter check {check['case']}: {check.get('error') or check.get('errors')}")
    return lines


def environment_lines(results: dict) -> list[str]:
    m = results["meta"]
    lines = [
        f"card: {m.get('card')}  driver: {m.get('driver')}  device: {m.get('device')}",
        f"torch {m.get('torch')}  triton {m.get('triton')}  CUDA {m.get('cuda')}  "
        f"python {m.get('python')}  numpy {m.get('numpy')}",
        f"date: {m.get('date')}  commit: {m.get('git_commit')}"
        + ("  (working tree modified)" if m.get("git_dirty") else "")
        + f"  profile: {m.get('profile')}",
    ]
    bw = results.get("copy_bandwidth_Bps")
    if finite(bw):
        lines.append(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    return lines


# --------------------------------------------------------------------------- formatting


def format_text(table: Table) -> str:
    title, headers, rows = table
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([title, line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def format_markdown(table: Table) -> str:
    title, headers, rows = table
    out = [f"### {title}", "", "| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def tables(results: dict, detail: bool) -> list[Table]:
    layers = results.get("layers", [])
    found: list[Table | None] = []
    if layers:
        found.append(layer_summary(layers))
        found.append(model_totals(layers))
    found.append(step_table(results.get("steps", [])))
    if detail and layers:
        found.append(detail_table(layers))
    return [t for t in found if t is not None]


# --------------------------------------------------------------------------- files


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def output_stem(out_dir: str, card: str, date: str, profile: str) -> str:
    """``<out_dir>/<card>-<date>-<profile>``, with ``-2``, ``-3``... rather than overwrite."""
    base = os.path.join(out_dir, f"{_slug(card)}-{date}-{profile}")
    stem, k = base, 1
    while any(os.path.exists(stem + ext) for ext in (".json", ".md", ".png")):
        k += 1
        stem = f"{base}-{k}"
    return stem


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_outputs(results: dict, stem: str) -> list[str]:
    """``stem.json``, ``stem.md`` and (with matplotlib) ``stem.png``; returns the paths written."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = []
    with open(stem + ".json", "w") as f:
        json.dump(_clean(results), f, indent=1)
    paths.append(stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown_report(results))
    paths.append(stem + ".md")
    png = write_plot(results, stem + ".png")
    if png:
        paths.append(png)
    return paths


def markdown_report(results: dict) -> str:
    parts = [f"# sn_fused benchmark ({results['meta'].get('profile')})", ""]
    parts += [f"- {line}" for line in environment_lines(results)]
    for note in results.get("notes", []):
        parts.append(f"- note: {note}")
    check = results.get("interpreter_check")
    if check:
        parts.append(f"- interpreter check: {check.get('summary')}")
        if "host_time" in check:
            from .host_time import format_lines

            first, *rows = format_lines(check["host_time"])
            parts.append(f"- {first}")
            parts += [f"  - {row.strip()}" for row in rows]
    for t in tables(results, detail=True):
        parts += ["", format_markdown(t)]
    errors = error_lines(results)
    if errors:
        parts += ["", "### Errors", ""] + [f"- `{e}`" for e in errors]
    timings = results.get("section_seconds")
    if timings:
        parts += ["", "Section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    return "\n".join(parts) + "\n"


def _plot_rows(rows: list[dict]) -> tuple[str, int, list[tuple[str, dict]]]:
    """The (dtype, n) to plot (fp32, n=1 if present) and its (shape, {impl: row}) cases by size."""
    cases = _by_case(rows)
    keys = list(dict.fromkeys((d, n) for (_s, d, n) in cases))
    dtype, n = ("fp32", 1) if ("fp32", 1) in keys else keys[0]
    picked = [(s, impls) for (s, d, k), impls in cases.items() if (d, k) == (dtype, n)
              and "sn_fused" in impls and "torch_param" in impls]
    picked.sort(key=lambda item: item[1]["sn_fused"]["numel"])
    return dtype, n, picked


def write_plot(results: dict, path: str) -> str | None:
    """Speedup over PyTorch and % of the memory floor per shape; None without matplotlib/data."""
    rows = results.get("layers", [])
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no PNG plot written")
        return None
    dtype, n, picked = _plot_rows(rows)
    if not picked:
        return None
    names = [s for s, _ in picked]
    x = list(range(len(names)))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.55 * len(names) + 3), 8), sharex=True)
    series = [("graph_fwd_us", "graph fwd"), ("eager_fwd_us", "eager fwd"),
              ("graph_fwdbwd_us", "graph fwd+bwd"), ("eager_fwdbwd_us", "eager fwd+bwd")]
    width = 0.8 / len(series)
    for k, (metric, label) in enumerate(series):
        ys = [_safe_div(impls["torch_param"].get(metric), impls["sn_fused"].get(metric)) for _, impls in picked]
        axes[0].bar([i + (k - 1.5) * width for i in x], ys, width, label=label)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("speedup vs PyTorch (x)")
    axes[0].legend(fontsize=8)
    floor_series = [("sn_fused", "pct_floor_graph_fwd", "sn_fused fwd"),
                    ("torch_param", "pct_floor_graph_fwd", "PyTorch fwd"),
                    ("sn_fused", "pct_floor_graph_fwdbwd", "sn_fused fwd+bwd"),
                    ("torch_param", "pct_floor_graph_fwdbwd", "PyTorch fwd+bwd")]
    timing = "graph"
    if not any(finite(impls[i].get(m)) for _, impls in picked for i, m, _ in floor_series):
        timing = "eager"
        floor_series = [(i, m.replace("graph", "eager"), lab) for i, m, lab in floor_series]
    for k, (impl, metric, label) in enumerate(floor_series):
        ys = [impls[impl].get(metric) or 0.0 for _, impls in picked]
        axes[1].bar([i + (k - 1.5) * width for i in x], ys, width, label=label)
    axes[1].axhline(100.0, color="k", lw=0.8)
    axes[1].set_ylabel(f"% of memory floor ({timing})")
    axes[1].legend(fontsize=8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"sn_fused vs PyTorch SN, {dtype}, n={n} -- {meta.get('card')}, torch {meta.get('torch')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe_div(a: Any, b: Any) -> float:
    return a / b if finite(a) and finite(b) and b > 0 else 0.0

