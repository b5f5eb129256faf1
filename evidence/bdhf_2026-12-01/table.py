"""The README's tables for the BDHF runs (reads the TensorBoard logs, which stay out of git for their size:
rerun run.sh to recreate them):  python evidence/bdhf_2026-12-01/table.py"""
import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).parent
GROUPS = {"autoencoder, HF and BDHF 1,800 s, Adam 600 s": ["ae_hf", "ae_bdhf", "ae_adam"],
          "curvature batch, 120 s": [f"curv{n}_{s}" for n in (100, 300, 1000, 3000) for s in ("hf", "bdhf")],
          "seqmnist7 LSTM, 300 s": ["lstm_hf", "lstm_bdhf", "lstm_adam"],
          "cifar10 ResNet (stand-in files), what an update costs": ["cifar_resnet_hf", "cifar_resnet_bdhf", "cifar_resnet_adam"]}


def examples_curve(run: Path, metric: str) -> np.ndarray:
    """(examples through gradients and curvature products, held-out metric) at each evaluation."""
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    grad = {e.step: e.value for e in events.Scalars("counts/examples_grad")}
    curv = {e.step: e.value for e in events.Scalars("counts/examples_curv")}
    return np.array([(grad[e.step] + curv[e.step], e.value) for e in events.Scalars(f"val/{metric}")
                     if e.step in grad])


def main() -> None:
    for group, names in GROUPS.items():
        runs = [(name, HERE / name) for name in names if (HERE / name / "summary.json").exists()]
        if not runs:
            continue
        summaries = {name: json.loads((path / "summary.json").read_text()) for name, path in runs}
        metric = next(iter(summaries.values()))["metric"]
        curves = {name: examples_curve(path, metric) for name, path in runs}
        common = min(curve[-1, 0] for curve in curves.values() if len(curve))
        print(f"\n{group} (metric {metric}; at equal examples: {common:.3g} examples through gradients and products)")
        print(f"| run | updates | s per update | epochs | examples | held-out {metric} at the end | "
              f"at {common:.3g} examples | training {metric} at the end |")
        print("|---|---|---|---|---|---|---|---|")
        for name, summary in summaries.items():
            curve = curves[name]
            at_common = np.interp(common, curve[:, 0], curve[:, 1]) if len(curve) else float("nan")
            train = summary.get(f"train_{metric}")
            print(f"| {name} | {summary['updates']} | {summary['wall_time_s'] / max(summary['updates'], 1):.2f} | "
                  f"{summary['epochs']:.2f} | {summary['examples_grad'] + summary['examples_curv']:.3g} | "
                  f"{summary[f'final_val_{metric}']:.4g} | {at_common:.4g} | "
                  f"{'' if train is None else f'{train:.4g}'} |")


if __name__ == "__main__":
    main()
