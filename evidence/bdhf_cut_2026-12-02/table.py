"""The README's tables for the BDHF runs with cut products, from each run's metrics.jsonl and summary.json (kept
in git):  python evidence/bdhf_cut_2026-12-02/table.py

Per group: each run's state at the end, its held-out metric at equal wall-clock (the latest evaluation at or
before each time) and at equal examples (interpolated between evaluations at the fewest examples any run of the
group reached; examples are cases through gradients plus cases through curvature products, a block product
counting as a product), and per solver the mean over seeds."""
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
GROUPS = {
    "MNIST deep autoencoder, 1,800 s each": ("ae", (600, 1200, 1800)),
    "curvature batch size on the autoencoder, 120 s each": ("curv", (60, 120)),
    "seqmnist7 3-layer LSTM, 300 s each": ("lstm", (150, 300)),
    "CIFAR-10 ResNet on stand-in files: what an update costs": ("cifar", ()),
}


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def at_time(evaluations: list[dict], metric: str, seconds: float) -> float:
    before = [e["val"][metric] for e in evaluations if e["wall_s"] <= seconds]
    return before[-1] if before else float("nan")


def at_examples(evaluations: list[dict], metric: str, examples: float) -> float:
    xs = [e["examples_grad"] + e["examples_curv"] for e in evaluations]
    return float(np.interp(examples, xs, [e["val"][metric] for e in evaluations])) if xs else float("nan")


def main() -> None:
    for title, (prefix, times) in GROUPS.items():
        runs = sorted(p for p in HERE.glob(f"{prefix}*") if (p / "summary.json").exists())
        if not runs:
            continue
        summaries = {run.name: json.loads((run / "summary.json").read_text()) for run in runs}
        evaluations = {run.name: records(run, "eval") for run in runs}
        metric = next(iter(summaries.values()))["metric"]
        common = min(e[-1]["examples_grad"] + e[-1]["examples_curv"] for e in evaluations.values() if e)
        print(f"\n{title} (held-out {metric}; equal examples: {common:.3g})")
        header = ["run", "updates", "s per update", "epochs", "examples", f"held-out {metric} at the end",
                  *(f"at {t} s" for t in times), f"at {common:.3g} examples", f"training {metric} at the end"]
        print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
        by_solver = defaultdict(list)
        for name, summary in summaries.items():
            curve = evaluations[name]
            train = summary.get(f"train_{metric}")
            row = [name, summary["updates"], f"{summary['wall_time_s'] / max(summary['updates'], 1):.2f}",
                   f"{summary['epochs']:.2f}", f"{summary['examples_grad'] + summary['examples_curv']:.3g}",
                   f"{summary[f'final_val_{metric}']:.4g}", *(f"{at_time(curve, metric, t):.4g}" for t in times),
                   f"{at_examples(curve, metric, common):.4g}", "" if train is None else f"{train:.4g}"]
            print("| " + " | ".join(map(str, row)) + " |")
            by_solver[name.rsplit("_s", 1)[0]].append(summary[f"final_val_{metric}"])
        means = {key: values for key, values in by_solver.items() if len(values) > 1}
        if means:
            print("\nmean over seeds at the end: " + "; ".join(
                f"{key} {statistics.fmean(values):.4g} ({', '.join(f'{v:.4g}' for v in values)})"
                for key, values in means.items()))


if __name__ == "__main__":
    main()
