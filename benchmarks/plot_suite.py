"""Draws the GPU suite's reports: what a reader would rather look at than read in a table.

Reads one or more `suite.json` files written by benchmarks/gpu_serving_suite.py and draws,
per scenario:

* output tok/s, with the roofline TPOT over the measured TPOT p50 written on each bar;
* where a decode step's time goes at the router: the last stage's device time, the rest of
  its launch-to-tokens wait, the stage's host work before the launch (prepare + launch), and
  what is left of the router's send-to-result time (the step queued behind the steps in
  flight before it, and the trips between router and stage), next to the router's own
  turnaround and the token's TPOT p50.

    python3 benchmarks/plot_suite.py suite.json [more.json ...] --out docs/images/suite.png \\
        [--title "2 x H200, 2026-11-30"]

Needs matplotlib (`pip install -e .[bench]`). Prints nothing but the path it wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_reports(paths: list[Path]) -> dict[str, dict]:
    """Scenario name -> report, later files overriding earlier ones of the same name."""
    reports: dict[str, dict] = {}
    for path in paths:
        reports.update(json.loads(path.read_text()))
    return reports


def decode_breakdown(report: dict) -> dict[str, float]:
    """A decode step's time at the router split into parts that add up to send-to-result (ms)."""
    profile = report["step_profile"]
    last = f"stage{report['layout']['pp'] - 1}"
    get = lambda name: float(profile.get(f"{last}_decode_{name}_ms", 0.0))  # noqa: E731
    device, wait = get("device"), get("wait")
    host = get("prepare") + get("launch")
    result = get("result")
    return {
        "device (last stage)": device,
        "wait beyond device": max(0.0, wait - device),
        "stage host work": host,
        "queued behind steps in flight, transit": max(0.0, result - wait - host),
    }


def draw(reports: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 2.8), sharey=True)
    positions = range(len(names))

    tok_s = [reports[n]["load"]["output_tok_s"] for n in names]
    bars = left.barh(positions, tok_s, color="#4a7fb5")
    for bar, name in zip(bars, names):
        roofline = reports[name].get("ratios", {}).get("tpot_p50_vs_roofline")
        label = f"{bar.get_width():,.0f}" + (f"  (TPOT at {roofline:.2f} of roofline)" if roofline else "")
        left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    left.set_yticks(list(positions), names)
    left.invert_yaxis()
    left.set_xlabel("output tok/s")
    left.set_xlim(0, max(tok_s) * 1.45)
    left.set_title("throughput")

    parts = [decode_breakdown(reports[n]) for n in names]
    colors = ("#2e7d32", "#9ccc65", "#ffb74d", "#e57373")
    starts = [0.0] * len(names)
    for (label, color) in zip(parts[0], colors):
        widths = [p[label] for p in parts]
        right.barh(positions, widths, left=starts, color=color, label=label)
        starts = [s + w for s, w in zip(starts, widths)]
    tpot = [reports[n]["load"]["tpot_p50_ms"] for n in names]
    turnaround = [reports[n]["step_profile"].get("router_turnaround_ms", float("nan")) for n in names]
    right.scatter(tpot, positions, marker="|", s=300, color="black", label="TPOT p50", zorder=3)
    for y, (total, t) in enumerate(zip(starts, turnaround)):
        right.text(total, y, f"  router turnaround {t:.1f}", va="center", fontsize=8)
    right.set_xlabel("ms per decode step, router send to result")
    right.set_xlim(0, max(max(starts), max(tpot)) * 1.4)
    right.set_title("where a decode step's time goes")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)

    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path, help="suite.json files (gpu_serving_suite.py --out DIR)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--only", default="", help="comma-separated scenarios, in this order (default: all)")
    p.add_argument("--title", default="stageserve GPU suite")
    args = p.parse_args()
    reports = load_reports(args.reports)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        missing = [n for n in wanted if n not in reports]
        if missing:
            raise SystemExit(f"not in the reports: {', '.join(missing)} (they hold {', '.join(reports)})")
        reports = {n: reports[n] for n in wanted}
    draw(reports, args.out, args.title)
    print(args.out)


if __name__ == "__main__":
    main()
