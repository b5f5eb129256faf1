"""The README's T = 100 tables from the runs' summaries (kept in git):
    python evidence/pathological_release_2026-12-02/t100/table.py
HF runs are in t100/<task>/s<seed> (addition_T200 among them); the first-order rows in ../t100fo/<solver>/<task>/s<seed>;
candidate changes to HF in ../t100_candidates/<candidate>/<task>/s<seed>."""
import json
from pathlib import Path

HERE = Path(__file__).parent
FIRST_ORDER = HERE.parent / "t100fo"
CANDIDATES = HERE.parent / "t100_candidates"
MS2011 = {  # M&S 2011 Figure 3 with structural damping: failure rate, mean k-minibatches to success (T = 100 unless named)
    "addition": (0, 3.7), "multiplication": (0, 9.1), "temporal_order": (0.25, 3.8), "temporal_order3": (0, 13.3),
    "permutation": (0, 3.5), "xor": (0.75, 10.5), "memorization5": (0, 3.0), "memorization20": (0, 13.5),
    "addition_T200": (0.25, 10.0)}
FAILURE_THRESHOLD = 50_000  # M&S 2011: a run unsolved after this many minibatches has failed


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _finished(runs) -> list[Path]:
    """The runs that have ended at least once (a run still in its first sitting has no summary yet)."""
    return sorted(run for run in runs if (run / "summary.json").exists())


def _hf_same_seed(task: str, run: Path) -> Path | None:
    """HF's run with the defaults on this task and seed (t100/<task>/s<seed>), if it has ended at least once."""
    hf_runs = _finished([HERE / task / run.name])
    return hf_runs[0] if hf_runs else None


def _left_plateau(run: Path, summary: dict) -> str:
    """k-minibatches at the first held-out error below half the first one (chance, on every task): where the run
    left its plateau ("–" if it has not)."""
    unit = summary.get("minibatch_size", 1000)
    evals = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["kind"] == "eval"]
    for row in evals:
        if row["val"]["error"] < evals[0]["val"]["error"] / 2:
            return f"{(row['examples_grad'] + row['examples_curv']) / unit / 1000:.2f}"
    return "–"


def _status(summary: dict) -> str:
    """The run's status; an HF run that spent M&S 2011's failure threshold (50k minibatches) unsolved has failed,
    as has one whose solving update took it past the threshold (run.max_minibatches binds after that update)."""
    failed = ((summary["status"] == "budget" and summary["minibatches"] >= FAILURE_THRESHOLD)
              or (summary["status"] == "solved" and summary["solved_minibatches"] > FAILURE_THRESHOLD))
    return f"failed at {FAILURE_THRESHOLD // 1000}k" if failed else summary["status"]


def _k_minibatches(summary: dict) -> str:
    unit = "" if summary.get("minibatch_size", 1000) == 1000 else f" (of {summary['minibatch_size']})"
    return f"{summary['minibatches'] / 1000:.2f}{unit}"


def hf_table() -> None:
    print("| task | seed | status | k-minibatches | error halved at k-minibatches | updates | held-out error | seconds "
          "| M&S 2011: failed, k-minibatches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, (failed, k) in MS2011.items():
        for run in _finished((HERE / task).glob("s*")):
            summary = _summary(run)
            print(f"| {task} | {run.name[1:]} | {_status(summary)} | {_k_minibatches(summary)} | "
                  f"{_left_plateau(run, summary)} | {summary['updates']} | {summary['final_val_error']:.4g} | {summary['wall_time_s']:.0f} | "
                  f"{failed:g}, {k} |")


def first_order_table() -> None:
    print("| task | solver | seed | status | k-minibatches | held-out error | seconds | HF, same seed: status, k-minibatches |")
    print("|---|---|---|---|---|---|---|---|")
    for task in MS2011:
        for solver in ("adam", "sgd"):
            for run in _finished((FIRST_ORDER / solver / task).glob("s*")):
                summary = _summary(run)
                hf_run = _hf_same_seed(task, run)
                hf_summary = _summary(hf_run) if hf_run else None
                hf = f"{_status(hf_summary)}, {_k_minibatches(hf_summary)}" if hf_summary else "not run"
                print(f"| {task} | {solver} | {run.name[1:]} | {summary['status']} | {_k_minibatches(summary)} | "
                      f"{summary['final_val_error']:.4g} | {summary['wall_time_s']:.0f} | {hf} |")


def candidates_table() -> None:
    print("| candidate | task | seed | status | k-minibatches | error halved at k-minibatches | updates | held-out error "
          "| seconds | defaults, same seed: status, k-minibatches, error halved at, updates |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for candidate in sorted(path for path in CANDIDATES.iterdir() if path.is_dir()):
        for task in MS2011:
            for run in _finished((candidate / task).glob("s*")):
                summary = _summary(run)
                default_run = _hf_same_seed(task, run)
                default = _summary(default_run) if default_run else None
                versus = (f"{_status(default)}, {_k_minibatches(default)}, {_left_plateau(default_run, default)}, "
                          f"{default['updates']}" if default else "not run")
                print(f"| {candidate.name} | {task} | {run.name[1:]} | {_status(summary)} | {_k_minibatches(summary)} | "
                      f"{_left_plateau(run, summary)} | {summary['updates']} | {summary['final_val_error']:.4g} | {summary['wall_time_s']:.0f} | "
                      f"{versus} |")


if __name__ == "__main__":
    hf_table()
    if FIRST_ORDER.exists():
        print()
        first_order_table()
    if CANDIDATES.exists():
        print()
        candidates_table()
