"""Time against sequence length for each attention layer and its peer, from attention_gpu.py's CSV.

    python benchmarks/plot_attention.py attention.csv [forgetting.csv ...] --out docs/attention_times.png

One panel per layer (forward and forward+backward, ours solid, the peer dashed), log-log axes, the tokens per
call (B x T) fixed by the benchmark's shapes. Needs matplotlib (not a dependency of ttr: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/attention_times.png"))
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)  # (layer, pass) -> [(T, ours ms, peer ms, peer)]
    for path in args.csv:
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["what"] in ("fwd", "fwd+bwd") and not row["layer"].startswith("local_linear_D"):
                    series[row["layer"], row["what"]].append(
                        (int(row["T"]), float(row["ours_ms"]), float(row["peer_ms"]), row["peer"]))
    layers = sorted({layer for layer, _ in series})
    figure, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False)
    for axis, layer in zip(axes[0], layers):
        for what, colour in (("fwd", "tab:blue"), ("fwd+bwd", "tab:red")):
            points = sorted(series.get((layer, what), []))
            if not points:
                continue
            T = [p[0] for p in points]
            axis.plot(T, [p[1] for p in points], "o-", color=colour, label=f"ttr {what}")
            axis.plot(T, [p[2] for p in points], "s--", color=colour, alpha=0.6, label=f"{points[0][3]} {what}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(layer)
        axis.set_xlabel("T (B x T fixed)")
        axis.set_ylabel("ms")
        axis.legend(fontsize=6)
    figure.suptitle(args.title)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
