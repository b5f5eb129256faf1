"""The README's table for these runs: python evidence/data_tasks_2026-12-01/table.py (reads the TensorBoard
logs, which stay out of git for their size: rerun run.sh to recreate them)."""
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).parent
STAND_INS = {"fashion_mnist", "cifar10"}
rows = ["| task | solver | updates | epochs | train loss: first → last | held-out metric at the end |",
        "|---|---|---|---|---|---|"]
for path in sorted(HERE.glob("*/summary.json"), key=lambda p: (p.parent.name.split("_", 1)[1], p.parent.name)):
    summary = json.loads(path.read_text())
    events = EventAccumulator(str(path.parent / "tb"), size_guidance={"scalars": 0}).Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    metric = summary["metric"]
    value = summary[f"final_val_{metric}"]
    shown = (f"error {value:.2%} (accuracy {summary['final_val_accuracy']:.2%})" if metric == "error"
             else f"{metric} {value:.4g}")
    if "train_squared_error" in summary:
        shown += f"; training squared error {summary['train_squared_error']:.4g}"
    task = summary["task"] + (" (stand-in)" if summary["task"] in STAND_INS else "")
    rows.append(f"| {task} | {summary['solver']} | {summary['updates']} | {summary['epochs']:.2f} | "
                f"{losses[0]:.4g} → {losses[-1]:.4g} | {shown} |")
print("\n".join(rows))
