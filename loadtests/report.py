"""Turn a benchmark run (bench.json's dict) into target verdicts, text and Markdown tables, and a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The issue's targets (benchmark figures, never test assertions).
TARGET_VS_RAW = 0.8  # of the in-process decode+model+post figure at its best batch size
TARGET_VS_HANDWRITTEN = 1.5
TARGET_VS_LITSERVE = 1.0
TARGET_P99_OVER_P50 = 2.0
OURS = (
    "embedded", "embedded-proxy", "embedded-haproxy", "embedded-deployments", "embedded-torchscript",
    "embedded-onnxruntime", "triton", "triton-proxy", "triton-haproxy",
)  # fmt: skip
NOISY_DRIFT = 0.10  # (a) measured again at the end differs by more than this: the figures are noisy


def _ratio(value: float, base: float | None) -> float | None:
    return value / base if base else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """For one model's results: saturation per system, ratios to (a) and (c), targets for ours."""
    model_rows = [r for r in results["inprocess"] if r["stage"] == "model"]
    model_limit = max((r["images_per_s"] for r in model_rows), default=None)
    pipeline_rows = [r for r in results["inprocess"] if r["stage"] == "pipeline"]
    # The bar for a server is what this process reaches doing the same work without HTTP.
    raw_limit = max((r["images_per_s"] for r in pipeline_rows), default=model_limit)
    systems: dict[str, Any] = {}
    for load in results["loads"]:
        entry = systems.setdefault(load["system"], {"saturation": None, "half_load": None})
        if load["mode"] == "closed":
            best = entry["saturation"]
            if best is None or load["throughput_rps"] > best["throughput_rps"]:
                entry["saturation"] = load
        else:
            entry["half_load"] = load
    handwritten = systems.get("handwritten", {}).get("saturation")
    hand_rps = handwritten["throughput_rps"] if handwritten else None
    litserve = systems.get("litserve", {}).get("saturation")
    lit_rps = litserve["throughput_rps"] if litserve else None
    summary: dict[str, Any] = {
        "raw_limit_images_per_s": raw_limit,
        "model_limit_images_per_s": model_limit,
        "handwritten_rps": hand_rps,
        "litserve_rps": lit_rps,
        "raw_drift": _raw_drift(results),
        "systems": {},
    }
    for name, entry in systems.items():
        sat, half = entry["saturation"], entry["half_load"]
        row: dict[str, Any] = {
            "saturation_rps": sat["throughput_rps"],
            "saturation_concurrency": sat["concurrency"],
            "vs_raw": _ratio(sat["throughput_rps"], raw_limit),
            "vs_handwritten": _ratio(sat["throughput_rps"], hand_rps),
            "vs_litserve": _ratio(sat["throughput_rps"], lit_rps),
            "half_load_p50_ms": half["p50_ms"] if half else None,
            "half_load_p99_ms": half["p99_ms"] if half else None,
            "half_load_p99_over_p50": half["p99_ms"] / half["p50_ms"]
            if half and half["p50_ms"] > 0
            else None,
            "errors": sum(l["errors"] for l in results["loads"] if l["system"] == name),
        }
        if name in OURS:
            row["targets"] = {
                f"saturation >= {TARGET_VS_RAW}x raw": _verdict(row["vs_raw"], TARGET_VS_RAW, at_least=True),
                f"saturation >= {TARGET_VS_HANDWRITTEN}x hand-written": _verdict(
                    row["vs_handwritten"], TARGET_VS_HANDWRITTEN, at_least=True
                ),
                f"saturation >= {TARGET_VS_LITSERVE}x LitServe": _verdict(
                    row["vs_litserve"], TARGET_VS_LITSERVE, at_least=True
                ),
                f"p99 <= {TARGET_P99_OVER_P50}x p50 at half load": _verdict(
                    row["half_load_p99_over_p50"], TARGET_P99_OVER_P50, at_least=False
                ),
            }
        summary["systems"][name] = row
    return summary


def _raw_drift(results: dict[str, Any]) -> float | None:
    """Relative change of the (a) figure measured again after the servers (a noise indicator)."""
    again = results.get("inprocess_again")
    if again is None:
        return None
    before = next(
        r for r in results["inprocess"] if r["stage"] == "model" and r["batch_size"] == again["batch_size"]
    )
    return again["images_per_s"] / before["images_per_s"] - 1


def _noise_line(results: dict[str, Any]) -> str | None:
    drift = results["summary"]["raw_drift"]
    if drift is None:
        return None
    again = results["inprocess_again"]
    flag = "  <- NOISY: the machine's load changed during the run" if abs(drift) > NOISY_DRIFT else ""
    return (
        f"(a) model batch {again['batch_size']} measured again at the end: "
        f"{again['images_per_s']:.1f} img/s ({drift:+.0%}){flag}"
    )


def _verdict(value: float | None, threshold: float, at_least: bool) -> str:
    if value is None or math.isnan(value):
        return "not measured"
    return "met" if (value >= threshold if at_least else value <= threshold) else "MISSED"


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


LABELS = {
    "embedded": "(b) ours embedded (default)",
    "embedded-proxy": "(b) ours embedded, Serve proxy",
    "embedded-haproxy": "(b) ours embedded, haproxy",
    "embedded-deployments": "(b) ours, models as deployments (before)",
    "embedded-torchscript": "(b) ours embedded, TorchScript",
    "embedded-onnxruntime": "(b) ours embedded, ONNX Runtime",
    "triton": "(b) ours triton",
    "triton-proxy": "(b) ours triton, Serve proxy",
    "triton-haproxy": "(b) ours triton, haproxy",
    "handwritten": "(c) hand-written",
    "litserve": "(d) litserve",
    "litserve-onnxruntime": "(d) litserve, ONNX Runtime",
}
COLUMNS = ("system", "load", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "x(a)", "x(c)", "x(d)")


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One model's figures as table cells (COLUMNS); (a) rows give the batch's median time as p50."""
    summary = results["summary"]
    raw, hand, lit = summary["raw_limit_images_per_s"], summary["handwritten_rps"], summary.get("litserve_rps")
    cells = []
    for r in results["inprocess"]:
        name = "(a) model alone" if r["stage"] == "model" else "(a) decode+model+post"
        rate = r["images_per_s"]
        cells.append((name, f"batch {r['batch_size']}", f"{rate:.1f}", f"{r['batch_ms_p50']:.1f}", "", "", "",
                      _fmt(_ratio(rate, raw), ".2f"), _fmt(_ratio(rate, hand), ".2f"),
                      _fmt(_ratio(rate, lit), ".2f")))  # fmt: skip
    for l in results["loads"]:
        load = f"closed c={l['concurrency']}" if l["mode"] == "closed" else f"open {l['offered_rps']:.1f}/s"
        rate = l["throughput_rps"]
        cells.append((LABELS.get(l["system"], l["system"]), load, f"{rate:.1f}", _fmt(l["p50_ms"]),
                      _fmt(l["p95_ms"]), _fmt(l["p99_ms"]), str(l["errors"]),
                      _fmt(_ratio(rate, raw), ".2f"), _fmt(_ratio(rate, hand), ".2f"),
                      _fmt(_ratio(rate, lit), ".2f")))  # fmt: skip
    return cells


def verdicts(results: dict[str, Any]) -> list[str]:
    """Saturation per system, the targets for ours, what was not measured, and the noise check."""
    lines = []
    noise = _noise_line(results)
    if noise:
        lines.append(noise)
    for name, row in results["summary"]["systems"].items():
        lines.append(
            f"{LABELS.get(name, name)}: saturation {row['saturation_rps']:.1f} img/s at c={row['saturation_concurrency']}"
            f" = {_fmt(row['vs_raw'], '.2f')}x (a), {_fmt(row['vs_handwritten'], '.2f')}x (c),"
            f" {_fmt(row.get('vs_litserve'), '.2f')}x (d);"
            f" p99/p50 at half load {_fmt(row['half_load_p99_over_p50'], '.2f')}; errors {row['errors']}"
        )
        lines += [f"    target {target}: {verdict}" for target, verdict in row.get("targets", {}).items()]
    lines += [f"{LABELS.get(n, n)}: not measured: {why}" for n, why in results["skipped"].items()]
    lines += [f"{LABELS.get(n, n)}: FAILED: {why}" for n, why in results["failed"].items()]
    return lines


def header(results: dict[str, Any]) -> str:
    """One line on what the run was measured on."""
    m = results["machine"]
    return (
        f"{results['started']} · {m['cpus']} CPUs ({m['processor']}) · CUDA {m['cuda']} · torch {m['torch']}"
        f" · load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end"
        f" · {results['wall_s']:.0f} s" + (f" · {results['note']}" if results["note"] else "")
    )


def table(results: dict[str, Any]) -> str:
    """One model's fixed-width table: every figure with its ratio to (a) raw and (c) hand-written."""
    widths = (42, 14, 8, 9, 9, 9, 7, 6, 6, 6)
    body = [COLUMNS, *rows(results)]
    lines = [
        f"model {results['model']}  (x(a): ratio to the best (a) decode+model+post figure; x(c), x(d): to (c), (d) at saturation)",
        *(
            "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in body
        ),
        "",
        *verdicts(results),
    ]
    lines.insert(2, "-" * sum(widths))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The run as Markdown (what RESULTS.md quotes): a table per model, then its verdicts."""
    lines = [f"Run {header(results)}"]
    for run in results["models"]:
        lines += ["", f"### {run['model']}", "", "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * 8]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows(run)]
        lines += ["", *(("  * " if line.startswith(" ") else "* ") + line.strip() for line in verdicts(run))]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model, throughput (x) against p50 and p99 latency (y, log); (a) limits as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = results["models"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 5 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        _plot_model(ax, run)
    fig.suptitle(
        f"throughput vs latency · {results['machine']['cpus']} CPUs · {results['started']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_model(ax: Any, run: dict[str, Any]) -> None:
    colours = {
        "embedded": "tab:blue",
        "embedded-proxy": "tab:olive",
        "embedded-deployments": "tab:brown",
        "triton-proxy": "tab:gray",
        "embedded-haproxy": "tab:cyan",
        "triton": "tab:purple",
        "triton-haproxy": "tab:pink",
        "handwritten": "tab:orange",
        "litserve": "tab:green",
        "embedded-torchscript": "tab:blue",
        "embedded-onnxruntime": "tab:red",
        "litserve-onnxruntime": "tab:olive",
    }
    for system in dict.fromkeys(load["system"] for load in run["loads"]):
        closed = [l for l in run["loads"] if l["system"] == system and l["mode"] == "closed"]
        xs = [l["throughput_rps"] for l in closed]
        colour = colours.get(system)
        ax.plot(xs, [l["p50_ms"] for l in closed], "o-", color=colour, label=f"{system} p50")
        ax.plot(xs, [l["p99_ms"] for l in closed], "s--", color=colour, alpha=0.6, label=f"{system} p99")
        for l in closed:
            ax.annotate(
                f"c={l['concurrency']}",
                (l["throughput_rps"], l["p50_ms"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, -9),
            )
        for l in run["loads"]:
            if l["system"] == system and l["mode"] == "open":
                ax.plot(
                    [l["throughput_rps"]] * 2, [l["p50_ms"], l["p99_ms"]], "*-", color=colour, markersize=11
                )
    for r in run["inprocess"]:
        ax.axvline(
            r["images_per_s"], color="grey", linestyle=":" if r["stage"] == "model" else "-.", linewidth=0.8
        )
        ax.text(
            r["images_per_s"],
            0.02,
            f" (a) {r['stage']} b={r['batch_size']}",
            rotation=90,
            fontsize=7,
            color="grey",
            transform=ax.get_xaxis_transform(),
            va="bottom",
        )
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(
        f"{run['model']} (closed loop at c clients; ★ = open loop at half saturation, p50 to p99)", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
