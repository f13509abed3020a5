"""Plot what the confidence scheduler sees and chooses: the measured step costs (SPS against
tokens in the verify batch, one line per batch size) and, from a serve_bench.py results file,
the share of request-steps at each verified depth per concurrency level.

    python benchmarks/plot_scheduler.py --costs STEP_COSTS.json [--sweep SWEEP.json] --out PNG

STEP_COSTS.json is a table the engine cached ($ASCEND_DSPARK_CACHE/step_costs/*.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", type=Path, required=True)
    parser.add_argument("--sweep", type=Path, default=None, help="serve_bench.py results (mode spec)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = json.loads(args.costs.read_text())
    panels = 2 if args.sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for b, row in zip(costs["batch_sizes"], costs["seconds"]):
        tokens = [b * (d + 1) for d in costs["depths"]]
        ax.plot(tokens, [1 / s for s in row], marker="o", label=f"batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the verify batch, batch x (depth + 1)")
    ax.set_ylabel("steps per second (SPS)")
    ax.set_title(f"measured step costs, depths {costs['depths']}\n{costs.get('device', '')}", fontsize=9)
    ax.legend(fontsize=7)
    if args.sweep:
        rows = [r for r in json.loads(args.sweep.read_text())["results"] if r["mode"] == "spec"]
        ax = axes[0][1]
        depth_max = max(len(r["server_speculation"].get("verify_length_counts", [])) for r in rows)
        bottoms = [0.0] * len(rows)
        labels = [f"C={r['concurrency']}" for r in rows]
        for d in range(depth_max):
            shares = []
            for r in rows:
                counts = r["server_speculation"].get("verify_length_counts", [])
                total = sum(counts) or 1
                shares.append((counts[d] if d < len(counts) else 0) / total)
            if any(shares):
                ax.bar(labels, shares, bottom=bottoms, label=f"depth {d}")
                bottoms = [b + s for b, s in zip(bottoms, shares)]
        ax.set_ylabel("share of request-steps")
        ax.set_title("verified depth chosen per load (confidence policy)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
