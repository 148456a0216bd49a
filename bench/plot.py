"""Plot images/s against max tiles for each contender and checkpoint size, from `bench.throughput` JSON.

    python -m bench.plot bench/results/h100-1b-run3.json bench/results/h100-2b-run3.json \\
        bench/results/h100-1b-transformers-run3.json --out docs/images-per-s-vs-tiles.png

Needs matplotlib (`pip install matplotlib`; not a dependency of raylens). Only give it files measured on one
kind of machine: the plot does not tell an H100 from an H200.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def series(paths: list[str]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(size, contender) -> [(max_tiles, images/s)] for every successful result."""
    out: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                if r.get("images_per_s"):
                    out[(r["size"], r["contender"])][r["max_tiles"]] = r["images_per_s"]
    return {key: sorted(points.items()) for key, points in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="InternVL2 shapes on one H100: images/s vs max tiles (greedy, 64 tokens)")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"1b": "-", "2b": "--", "tiny": ":"}
    for (size, contender), points in sorted(series(a.results).items()):
        tiles, rates = zip(*points)
        ax.plot(tiles, rates, styles.get(size, "-."), marker="o", label=f"{contender} ({size})")
        for t, r in points:
            ax.annotate(f"{r:.1f}", (t, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("max tiles per image (+ thumbnail when > 1)")
    ax.set_ylabel("images/s (steady state)")
    ax.set_yscale("log")
    ax.set_xticks([1, 12])
    ax.set_title(a.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
