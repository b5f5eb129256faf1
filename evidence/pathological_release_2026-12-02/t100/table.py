"""The README's T = 100 table from the runs' summaries (kept in git):
    python evidence/pathological_release_2026-12-02/t100/table.py"""
import json
from pathlib import Path

HERE = Path(__file__).parent
MS2011 = {  # M&S 2011 Figure 3, T = 100, with structural damping: failure rate, mean k-minibatches to success
    "addition": (0, 3.7), "multiplication": (0, 9.1), "temporal_order": (0.25, 3.8), "temporal_order3": (0, 13.3),
    "permutation": (0, 3.5), "xor": (0.75, 10.5), "memorization5": (0, 3.0), "memorization20": (0, 13.5)}


def main() -> None:
    print("| task, T = 100 | seed | status | k-minibatches | updates | held-out error | seconds | M&S 2011: failed, k-minibatches |")
    print("|---|---|---|---|---|---|---|---|")
    for task in MS2011:
        for run in sorted((HERE / task).glob("s*")):
            summary = json.loads((run / "summary.json").read_text())
            failed, k = MS2011[task]
            unit = "" if summary.get("minibatch_size", 1000) == 1000 else f" (of {summary['minibatch_size']})"
            print(f"| {task} | {run.name[1:]} | {summary['status']} | {summary['minibatches'] / 1000:.2f}{unit} | "
                  f"{summary['updates']} | {summary['final_val_error']:.4g} | {summary['wall_time_s']:.0f} | "
                  f"{failed:g}, {k} |")


if __name__ == "__main__":
    main()
