"""The paper's §6 claim, tried: one test-time-regression layer, even plain linear attention, with a short
convolution before it (so that a key can be read with the token before it) solves multi-query associative
recall. Trains 2-block models of several specs, with and without short convolutions, over a sweep of
key-value pairs and model widths (Zoology's protocol, `ttr eval`'s task), and writes the accuracy table and a
plot.

    python examples/mqar.py --processes 12  # on a GPU: the full sweep, a process per layer and convolution
                                            # (docs/mqar.md: about 8 minutes on an H100)
    python examples/mqar.py --quick         # a small sweep that runs on a CPU in a few minutes
    python examples/mqar.py --specs mesa --csv rows.csv      # part of the sweep, its rows kept as they finish
    python examples/mqar.py --from-csv a.csv b.csv           # the table and plot of saved rows
    python examples/mqar.py --specs linear_attention --lrs 1e-3 3e-3 1e-2 --seeds 0 1   # each row the best run

Writes docs/mqar.md's table to stdout and docs/mqar.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttr_codegen.evaluate import Setting, load_layer, train  # noqa: E402

SPECS = ["linear_attention", "gated_delta_rule", "longhorn", "mesa", "softmax_attention", "local_linear_attention_cg"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", nargs="*", default=SPECS)
    parser.add_argument("--pairs", nargs="*", type=int, default=[8, 16, 32])
    parser.add_argument("--widths", nargs="*", type=int, default=[64, 128])
    parser.add_argument("--conv", nargs="*", choices=["yes", "no"], default=["yes", "no"],
                        help="with the layer's short convolution, without it, or both (a sweep split over processes)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lrs", nargs="*", type=float, default=[3e-3], help="learning rates: a row keeps the best")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds: a row keeps the best")
    parser.add_argument("--quick", action="store_true", help="a small sweep for a CPU")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "mqar.png")
    parser.add_argument("--csv", type=Path, help="append each finished row to this file")
    parser.add_argument("--from-csv", nargs="*", type=Path, help="print the table and plot of saved rows only")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the sweep as a process per layer and convolution, this many at a time (a GPU "
                             "trains these small models far below its capacity: 12 fit an H100's 16 cores)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.widths, args.seq_len, args.vocab, args.steps, args.batch = [4, 8], [32], 64, 256, 150, 32
    if args.processes > 1:
        args.from_csv = _in_processes(args)
    if args.from_csv:
        rows = [(r[0], r[1] == "True", int(r[2]), int(r[3]), float(r[4]))
                for path in args.from_csv for r in csv.reader(path.open())]
        args.pairs = sorted({r[3] for r in rows})
        args.widths = sorted({r[2] for r in rows})
        _report(rows, args)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(tempfile.mkdtemp(prefix="ttr-mqar-"))
    rows = []
    start = time.perf_counter()
    for spec in args.specs:
        package, name = load_layer(ROOT / "specs" / f"{spec}.yaml", folder)
        for conv in (choice == "yes" for choice in args.conv):
            for width in args.widths:
                for pairs in args.pairs:
                    setting = Setting("mqar", pairs, args.seq_len, args.vocab)
                    # Zoology's protocol: the best of a sweep of learning rates (and here of seeds).
                    results = [train(package, name, setting, width, blocks=2, heads=2, steps=args.steps,
                                     batch=args.batch, lr=lr, layer_kwargs={"use_short_conv": conv}, device=device,
                                     seed=seed)
                               for lr in args.lrs for seed in args.seeds]
                    result = max(results, key=lambda r: r["score"])
                    result["seconds"] = sum(r["seconds"] for r in results)
                    rows.append((name, conv, width, pairs, result["score"]))
                    if args.csv:
                        with args.csv.open("a", newline="") as file:
                            csv.writer(file).writerow(rows[-1])
                    print(f"{name:<28} conv={conv!s:<5} width={width:<4} pairs={pairs:<3} accuracy={result['score']:.3f}"
                          f"  ({result['seconds']:.0f} s)", flush=True)
    print(f"\n{device}, {args.steps} steps, batch {args.batch}, seq_len {args.seq_len}, vocab {args.vocab}, "
          f"best of learning rates {args.lrs} and seeds {args.seeds}, {time.perf_counter() - start:.0f} s in all\n")
    _report(rows, args)


def _in_processes(args) -> list[Path]:
    """Runs this script once per layer and convolution setting, `args.processes` at a time, each on one CPU
    thread (torch's default of a thread per core oversubscribes the cores); returns the files of rows they
    wrote."""
    folder = Path(tempfile.mkdtemp(prefix="ttr-mqar-parts-"))
    shared = ["--pairs", *map(str, args.pairs), "--widths", *map(str, args.widths), "--seq-len", str(args.seq_len),
              "--vocab", str(args.vocab), "--steps", str(args.steps), "--batch", str(args.batch),
              "--lrs", *map(str, args.lrs), "--seeds", *map(str, args.seeds), "--plot", str(folder / "part.png")]
    parts = [(spec, conv) for conv in args.conv for spec in args.specs]
    started, files = [], []
    for i, (spec, conv) in enumerate(parts):
        if i >= args.processes:
            started[i - args.processes].wait()  # the oldest part first: parts take similar times
        files.append(folder / f"{spec}-{conv}.csv")
        command = [sys.executable, __file__, "--specs", spec, "--conv", conv, "--csv", str(files[-1]), *shared]
        started.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    failed = [part for part, process in zip(parts, started) if process.wait() != 0]
    if failed:
        print(f"parts that failed (layer, convolution): {failed}", file=sys.stderr)
    return [f for f in files if f.exists()]


def _report(rows, args) -> None:
    """The markdown table (a row per layer, short convolution and width; a column per number of pairs), then
    the plot."""
    print("| layer | short conv | width | " + " | ".join(f"{p} pairs" for p in args.pairs) + " |")
    print("|---|---|---|" + "---|" * len(args.pairs))
    for name in _names(rows):
        for conv in (True, False):
            for width in args.widths:
                scores = {r[3]: r[4] for r in rows if r[0] == name and r[1] == conv and r[2] == width}
                if scores:
                    print(f"| {name} | {'yes' if conv else 'no'} | {width} | "
                          + " | ".join(f"{scores[p]:.2f}" if p in scores else "–" for p in args.pairs) + " |")
    _plot(rows, args)


def _names(rows) -> list[str]:
    """The layers of the rows, in SPECS' order (the parts of a sweep finish in any order)."""
    return sorted(dict.fromkeys(r[0] for r in rows), key=lambda n: SPECS.index(n) if n in SPECS else len(SPECS))


def _plot(rows, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed")
        return
    names = _names(rows)
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], names):
        for conv, style in ((True, "-"), (False, ":")):
            for width in args.widths:
                points = sorted((r[3], r[4]) for r in rows if r[0] == name and r[1] == conv and r[2] == width)
                axis.plot([p[0] for p in points], [p[1] for p in points], "o" + style,
                          label=f"width {width}{', conv' if conv else ''}")
        axis.set_xscale("log", base=2)
        axis.set_title(name, fontsize=8)
        axis.set_xlabel("key-value pairs")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
