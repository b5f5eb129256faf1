"""The figures and the table of the SGN reproduction, from the sweeps in this folder:

    pip install -e '.[plots]'; python evidence/sgn_2026-12-01/plot.py

Per benchmark, the training loss and the held-out metric against seconds and against epochs, SGD solid and
SGN dashed, the mean over seeds with a band from the lowest to the highest seed (as the SGN release plots).
"""
import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).parent
BENCHMARKS = {  # figure name: (sweeps, held-out metric tag, budget seconds)
    "mnist": (["sgd1_mnist", "sgd0.1_mnist", "sgn3_mnist"], "val/accuracy", 100),
    "boston": (["sgd0.01_boston", "sgn5_boston", "sgn5_boston_reject_uphill", "sgn5_boston_guard_ratio"],
               "val/mse", 10),
    "sine_f10": (["sgd0.1_sine_f10", "sgn20_sine_f10"], "val/mse", 100),
    "sine_f100": (["sgd0.1_sine_f100", "sgn30_sine_f100"], "val/mse", 100),
}


def curves(run: Path, tag: str) -> dict[str, np.ndarray]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    wall = {e.step: e.value for e in events.Scalars("time/wall_s")}
    examples = {e.step: e.value for e in events.Scalars("counts/examples_grad")}
    train_cases = json.loads((run / "summary.json").read_text())
    train_cases = train_cases["examples_grad"] / train_cases["epochs"]
    out = {}
    for name, key in (("train", "train/loss"), ("val", tag)):
        points = [(wall[e.step], examples[e.step] / train_cases, e.value) for e in events.Scalars(key) if e.step in wall]
        out[name] = np.array(points)
    return out


def on_grid(series: list[np.ndarray], column: int, grid: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(grid, s[:, column], s[:, 2], left=np.nan, right=np.nan) for s in series])


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for figure, (sweeps, tag, budget) in BENCHMARKS.items():
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for sweep in sweeps:
            runs = sorted(p.parent for p in (HERE / sweep).glob("*/summary.json"))
            if not runs:
                continue
            data = [curves(run, tag) for run in runs]
            style = "--" if sweep.startswith("sgn") else "-"
            for row, part in enumerate(("train", "val")):
                for column, (axis_column, x_label) in enumerate(((0, "seconds"), (1, "epochs"))):
                    series = [d[part] for d in data]
                    end = min(s[:, axis_column].max() for s in series)
                    grid = np.linspace(0, end, 200)
                    values = on_grid(series, axis_column, grid)
                    axis = axes[row, column]
                    axis.plot(grid, np.nanmean(values, 0), style, label=f"{label(sweep)} ({len(runs)} seeds)")
                    axis.fill_between(grid, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.2)
                    axis.set_xlabel(x_label)
                    axis.set_ylabel("training loss" if part == "train" else tag)
                    if part == "train" or tag != "val/accuracy":
                        axis.set_yscale("log")
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"{figure}: SGD solid, SGN dashed; mean and min-max over seeds (budget {budget} s per run)")
        fig.tight_layout()
        fig.savefig(HERE / f"{figure}.png", dpi=80)
        plt.close(fig)


def label(sweep: str) -> str:
    """sgd1_mnist → SGD, lr 1; sgn5_boston_reject_uphill → SGN(5), reject_uphill."""
    solver, _, rest = sweep.partition("_")
    variant = rest.split("_", 1)[1] if rest.startswith("boston_") else ""
    name = f"SGD, lr {solver[3:]}" if solver.startswith("sgd") else f"SGN({solver[3:]})"
    return f"{name}, {variant}" if variant else name


def table() -> str:
    rows = ["| benchmark | solver | seeds | updates | epochs | held-out metric at the budget, mean (min–max) |",
            "|---|---|---|---|---|---|"]
    for figure, (sweeps, tag, budget) in BENCHMARKS.items():
        for sweep in sweeps:
            summaries = [json.loads(p.read_text()) for p in sorted((HERE / sweep).glob("*/summary.json"))]
            if not summaries:
                continue
            key = "final_val_accuracy" if tag == "val/accuracy" else "final_val_mse"
            values = np.array([s[key] for s in summaries])
            shown = (f"{values.mean():.2%} ({values.min():.2%}–{values.max():.2%})" if tag == "val/accuracy"
                     else f"{values.mean():.4g} ({values.min():.4g}–{values.max():.4g})")
            rows.append(f"| {figure} ({budget} s) | {label(sweep)} | {len(summaries)} | "
                        f"{np.mean([s['updates'] for s in summaries]):.0f} | "
                        f"{np.mean([s['epochs'] for s in summaries]):.1f} | {shown} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
    print(table())
