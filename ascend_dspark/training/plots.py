"""Plots of an evaluation report, drawn from its JSON alone, so they can be redrawn on any
machine (the one that evaluated may have no display, or no matplotlib):

    python -m ascend_dspark.training.plots results/eval/eval.json [--out DIR]

- `acceptance_<dataset>.png`: conditional acceptance per draft position, one line per
  drafter, one panel per temperature (the DSpark paper's Fig. 2).
- `reliability_<drafter>.png`, for drafters with a confidence head: reliability diagrams,
  one row per temperature; left, each c_k against its own acceptance at reached
  positions; right, the prefix survival prod c against "all drafts so far accepted"
  (DeepSpec's view); one line per dataset, over 20 equal-width bins.

Figures are built with `matplotlib.figure.Figure` (Agg canvas, no pyplot, no global
backend switch). Without matplotlib: one warning, no plots; the JSON and table are
unaffected.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

_warned = False


def _figure_class():
    """matplotlib's Figure, or None (with one warning per process) when it is missing."""
    global _warned
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            warnings.warn("matplotlib is not installed: evaluation plots are skipped (pip install matplotlib, "
                          "then redraw with `python -m ascend_dspark.training.plots DIR/eval.json`)", stacklevel=3)
            _warned = True
        return None
    return Figure


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    """Every plot of the report into `out_dir`; the paths written ([] without matplotlib)."""
    figure = _figure_class()
    rows = report.get("results", [])
    if figure is None or not rows:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        path = out / f"acceptance_{_slug(dataset)}.png"
        plot_acceptance(figure, [r for r in rows if r["dataset"] == dataset], dataset, path)
        paths.append(path)
    for drafter in dict.fromkeys(r["drafter"] for r in rows if r.get("calibration")):
        path = out / f"reliability_{_slug(drafter)}.png"
        plot_reliability(figure, [r for r in rows if r["drafter"] == drafter and r.get("calibration")], drafter, path)
        paths.append(path)
    return paths


def plot_acceptance(figure, rows: list[dict], dataset: str, path: Path) -> None:
    temps = sorted({r["temperature"] for r in rows})
    width = max(len(r["conditional_acceptance"]) for r in rows)
    fig = figure(figsize=(4.8 * len(temps), 3.8))
    axes = fig.subplots(1, len(temps), squeeze=False)[0]
    for ax, t in zip(axes, temps):
        for r in (r for r in rows if r["temperature"] == t):
            points = [(k + 1, y) for k, y in enumerate(r["conditional_acceptance"]) if y is not None]
            if points:
                xs, ys = zip(*points)
                tau = f"{r['tau']:.2f}" if r["tau"] is not None else "-"
                ax.plot(xs, ys, "o-", markersize=4, label=f"{r['drafter']} (tau {tau})")
        ax.set_title(f"{dataset}, T={t:g}", fontsize=10)
        ax.set_xticks(range(1, width + 1))
        ax.set_xlabel("draft position k")
        ax.set_ylabel("P(k accepted | 1..k-1 accepted)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_reliability(figure, rows: list[dict], drafter: str, path: Path) -> None:
    temps = sorted({r["temperature"] for r in rows})
    fig = figure(figsize=(9.0, 4.2 * len(temps)))
    axes = fig.subplots(len(temps), 2, squeeze=False)
    views = (("conditional", "confidence c_k", "observed acceptance of draft k"),
             ("survival", "predicted survival prod c_i", "observed prefix survival"))
    for i, t in enumerate(temps):
        for j, (view, xlabel, ylabel) in enumerate(views):
            ax = axes[i][j]
            ax.plot([0.0, 1.0], [0.0, 1.0], "--", color="0.6", linewidth=1.0)
            for r in (r for r in rows if r["temperature"] == t):
                report = r["calibration"][view]
                bins = report["reliability"]
                ece = report["summary"]["ece"]
                label = f"{r['dataset']} (ECE {ece:.3f})" if ece is not None else r["dataset"]
                ax.plot([b["mean_pred"] for b in bins], [b["mean_label"] for b in bins], "o-", markersize=3,
                        label=label)
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(0.0, 1.0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{drafter}, T={t:g}: {view}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_training(logs: dict[str, Path], path: Path) -> Path | None:
    """Training curves from `train_log.jsonl` files: loss and the teacher-forced expected
    accepted length (tau_prob) against the step, one line per run."""
    figure = _figure_class()
    if figure is None:
        return None
    fig = figure(figsize=(10, 3.8))
    loss_ax, tau_ax = fig.subplots(1, 2)
    for name, log in logs.items():
        rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        loss_ax.plot(steps, [r["loss"] for r in rows], label=name, lw=1)
        tau_ax.plot(steps, [r["metrics"]["tau_prob"] for r in rows], label=name, lw=1)
    loss_ax.set(xlabel="step", ylabel="loss (each recipe's own mix)", yscale="log", title="training loss")
    tau_ax.set(xlabel="step", ylabel="1 + sum_k prod_i<=k (1 - TV_i)", title="expected accepted length (T=1, teacher forced)")
    tau_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)) or "_"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redraw the plots of an evaluation report.")
    parser.add_argument("report", type=Path, nargs="?", help="eval.json written by `ascend-dspark eval`")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the report's)")
    parser.add_argument("--training", nargs="+", default=[], metavar="NAME=TRAIN_LOG",
                        help="also draw training_curves.png from train_log.jsonl files")
    args = parser.parse_args(argv)
    paths = write_plots(json.loads(args.report.read_text()), args.out or args.report.parent) if args.report else []
    if args.training:
        logs = dict(item.split("=", 1) for item in args.training)
        out = args.out or (args.report.parent if args.report else Path("."))
        drawn = plot_training(logs, out / "training_curves.png")
        paths += [drawn] if drawn else []
    for p in paths:
        print(p)
    return 0 if paths else 1


if __name__ == "__main__":
    raise SystemExit(main())
