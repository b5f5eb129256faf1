"""The README's table for the BDHF damping runs, from their metrics.jsonl (kept in git):
    python evidence/bdhf_2026-12-02/table.py"""
import json
from pathlib import Path

HERE = Path(__file__).parent
RUNS = ("ae_bdhf_shared", "ae_bdhf_per_block")


def evaluations(run: Path) -> list[dict]:
    return [record for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if record["kind"] == "eval"]


def main() -> None:
    curves = {name: evaluations(HERE / name) for name in RUNS}
    summaries = {name: json.loads((HERE / name / "summary.json").read_text()) for name in RUNS}
    updates = sorted(set.intersection(*({e["update"] for e in curve} for curve in curves.values())))
    print("| `solver.block_damping` | " + " | ".join(f"update {u}" for u in updates)
          + " | at the end (900 s) | updates | s per update | λ at the end (geometric mean; min–max) |")
    print("|---" * (len(updates) + 5) + "|")
    for name, curve in curves.items():
        at = {e["update"]: e["val"]["squared_error"] for e in curve}
        last = [json.loads(line) for line in (HERE / name / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "update"][-1]
        spread = (f"; {last['lambda_min']:.3g}–{last['lambda_max']:.3g}" if "lambda_min" in last else "")
        summary = summaries[name]
        print(f"| {name.removeprefix('ae_bdhf_')} | " + " | ".join(f"{at[u]:.2f}" for u in updates)
              + f" | {summary['final_val_squared_error']:.2f} | {summary['updates']} | "
              f"{summary['wall_time_s'] / summary['updates']:.1f} | {last['lambda']:.3g}{spread} |")


if __name__ == "__main__":
    main()
