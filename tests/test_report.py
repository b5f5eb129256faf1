"""The sweep report counts failures and averages minibatches to success over solved runs only."""
from __future__ import annotations

import json

import pytest

from hfrun.errors import HfrunError
from hfrun.report import collect, main, rows


def _summary(directory, task, solver, solved, minibatches, update=None, status=None):
    directory.mkdir(parents=True)
    summary = {"task": task, "solver": solver, "solved": solved, "minibatches": 5000.0, "wall_time_s": 10.0,
               "final_val_error": 0.0 if solved else 0.3, "metric": "error",
               "status": status or ("solved" if solved else "budget"), "task_protocol": "release"}
    if solved:
        summary["solved_minibatches"] = minibatches
        summary["solved_update"] = update if update is not None else int(minibatches // 100)
    (directory / "summary.json").write_text(json.dumps(summary))


def test_failure_rate_and_mean_over_successes(tmp_path):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 1000.0, update=10)
    _summary(tmp_path / "1", "addition_T30", "hf", True, 3000.0, update=25)
    _summary(tmp_path / "2", "addition_T30", "hf", False, None)
    _summary(tmp_path / "3", "addition_T30", "adam", False, None)
    table = {(r["task"], r["solver"]): r for r in rows(collect([tmp_path]))}
    hf = table["addition_T30", "hf"]
    assert hf["runs"] == 3 and abs(hf["failure_rate"] - 1 / 3) < 1e-12
    assert hf["kminibatches_to_success"] == 2.0 and hf["kminibatches_sd"] == pytest.approx(2 ** 0.5)
    assert hf["updates_to_success"] == 17.5 and hf["updates_sd"] == pytest.approx(7.5 * 2 ** 0.5)
    assert table["addition_T30", "adam"]["failure_rate"] == 1.0
    assert table["addition_T30", "adam"]["kminibatches_to_success"] is None
    assert table["addition_T30", "adam"]["updates_to_success"] is None


def test_split_by_a_config_value_read_from_each_run(tmp_path):
    for index, (lr, solved) in enumerate([(0.001, True), (0.01, False), (0.01, False)]):
        run = tmp_path / str(index)
        _summary(run, "addition_T30", "adam", solved, 800.0 if solved else None)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(f"solver:\n  name: adam\n  lr: {lr}\n")
    _summary(tmp_path / "bare", "addition_T30", "adam", False, None)  # a copied summary without its config
    table = {(r["task"], r["solver"]): r for r in rows(collect([tmp_path], ("solver.lr",)))}
    assert table["addition_T30", "adam solver.lr=0.001"]["failure_rate"] == 0.0
    assert table["addition_T30", "adam solver.lr=0.01"]["runs"] == 2
    assert table["addition_T30", "adam solver.lr=?"]["runs"] == 1
    hf_run = tmp_path / "hf"
    _summary(hf_run, "addition_T30", "hf", True, 2000.0)
    (hf_run / ".hydra").mkdir()
    (hf_run / ".hydra" / "config.yaml").write_text("solver:\n  name: hf\n")
    assert ("addition_T30", "hf") in {(r["task"], r["solver"]) for r in rows(collect([tmp_path], ("solver.lr",)))}


def test_only_runs_that_ended_by_their_own_outcome_are_attempts(tmp_path):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 1000.0, update=10)
    _summary(tmp_path / "1", "addition_T30", "hf", False, None)  # budget: a failure to solve
    _summary(tmp_path / "2", "addition_T30", "hf", False, None, status="interrupted")
    _summary(tmp_path / "3", "addition_T30", "hf", False, None, status="error")
    (row,) = rows(collect([tmp_path]))
    assert row["runs"] == 4 and row["failure_rate"] == 0.5
    assert row["statuses"] == "budget 1, error 1, interrupted 1, solved 1"
    assert row["final_error_unsolved"] == [0.3]


def test_runs_without_a_success_criterion_are_reported_too(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(
        {"task": "linreg", "solver": "adam", "status": "budget", "metric": "mse", "final_val_mse": 0.5,
         "minibatches": 2.0, "wall_time_s": 1.0}))
    (row,) = rows(collect([tmp_path]))
    assert row["failure_rate"] is None and row["final_metric"] == "mse 0.5" and row["statuses"] == "budget 1"


@pytest.mark.parametrize("make,fragment", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: root, "No summary.json below"),
    (lambda root: (root / "x").mkdir() or (root / "x" / "summary.json").write_text('{"loss": 1}') and root,
     "is not an hfrun summary: it lacks task, solver, status"),
])
def test_unusable_input_is_an_error_with_exit_status_1(tmp_path, capsys, make, fragment):
    path = make(tmp_path)
    with pytest.raises(HfrunError, match=fragment):
        collect([path])
    with pytest.raises(SystemExit) as exited:
        main([str(path)])
    assert exited.value.code == 1 and fragment.split(":")[0] in " ".join(capsys.readouterr().err.split())


def _metrics(directory, slope, updates=20):
    """metrics.jsonl of a run whose loss falls as exp(−slope·update) and whose error is evaluated every 5."""
    import math

    lines = []
    for update in range(1, updates + 1):
        record = {"kind": "update", "update": update, "wall_s": 0.1 * update, "examples_grad": 1000 * update,
                  "examples_curv": 500 * update, "loss": math.exp(-slope * update), "lambda": 1.0}
        lines.append(json.dumps(record))
        if update % 5 == 0:
            lines.append(json.dumps({**{k: record[k] for k in ("update", "wall_s", "examples_grad", "examples_curv")},
                                     "kind": "eval", "val": {"error": 0.5 / update}}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_markdown_and_csv_hold_the_table_values(tmp_path, capsys):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 1000.0, update=10)
    _summary(tmp_path / "1", "addition_T30", "hf", False, None)
    main([str(tmp_path), "--format", "markdown"])
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0].startswith("| task | solver | runs |") and markdown[1].startswith("|---|")
    assert markdown[2].startswith("| addition_T30 | hf | 2 | budget 1, solved 1 | 0.5 | 1 | – | 10 | – |")
    main([str(tmp_path), "--format", "csv"])
    import csv
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert table[0]["task"] == "addition_T30" and float(table[0]["failure_rate"]) == 0.5
    assert float(table[0]["kminibatches_to_success"]) == 1.0


def test_plot_writes_a_figure_of_every_configuration(tmp_path, capsys):
    import matplotlib.image

    for index, (solver, slope) in enumerate([("hf", 0.5), ("hf", 0.6), ("sgd", 0.05)]):
        _summary(tmp_path / str(index), "addition_T30", solver, False, None)
        _metrics(tmp_path / str(index), slope)
    _summary(tmp_path / "old", "addition_T30", "hf", False, None)  # a run from before metrics.jsonl
    figure = tmp_path / "curves.png"
    main([str(tmp_path), "--plot", str(figure)])
    err = capsys.readouterr().err
    assert "wrote" in err and "old" in err, "the run without metrics.jsonl is named"
    image = matplotlib.image.imread(figure)
    assert image.shape[0] > 400 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05, "the figure is not blank"


def test_band_is_the_mean_and_range_of_the_runs_on_a_common_grid():
    from hfrun.report import band

    grid, mean, low, high, count = band([([0, 10], [0, 10]), ([0, 5], [2, 7])], points=11)
    assert list(grid) == list(range(11)), "to the longest run's end"
    assert list(count) == [2] * 6 + [1] * 5, "past its end a run no longer counts"
    assert list(mean[:6]) == [1, 2, 3, 4, 5, 6] and list(low[:6]) == [0, 1, 2, 3, 4, 5]
    assert list(high[:6]) == [2, 3, 4, 5, 6, 7] and list(mean[6:]) == [6, 7, 8, 9, 10]


def test_a_figure_that_cannot_be_written_is_an_error_after_the_table(tmp_path, capsys):
    _summary(tmp_path / "0", "addition_T30", "hf", False, None)
    _metrics(tmp_path / "0", 0.5)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--plot", str(tmp_path / "missing" / "x.png"), "--format", "csv"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "could not be written" in captured.err
    assert captured.out.startswith("task,solver,runs"), "the table is printed first"


def test_plot_without_any_metrics_is_an_error(tmp_path, capsys):
    _summary(tmp_path / "0", "addition_T30", "hf", False, None)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1 and "metrics.jsonl" in capsys.readouterr().err


def test_ms2011_layout_sets_the_papers_figure_3_beside_hfruns(tmp_path, capsys):
    _summary(tmp_path / "0", "addition_T30", "hf", True, 2000.0, update=20)
    _summary(tmp_path / "1", "addition_T30", "hf", False, None)
    _summary(tmp_path / "2", "linreg", "hf", False, None)  # not a pathological task: no row
    main([str(tmp_path), "--layout", "ms2011", "--format", "csv"])
    import csv
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(table) == 1 and table[0]["task"] == "addition_T30"
    assert float(table[0]["failure_rate"]) == 0.5 and float(table[0]["ms2011_failure_rate"]) == 0.0
    assert float(table[0]["kminibatches_to_success"]) == 2.0 and float(table[0]["ms2011_kminibatches"]) == 1.6


def test_sgn_layout_gives_the_metric_at_given_seconds_and_epochs(tmp_path, capsys):
    for index, slope in enumerate((0.5, 0.6)):
        _summary(tmp_path / str(index), "mnist", "sgn", False, None)
        summary = json.loads((tmp_path / str(index) / "summary.json").read_text())
        summary.update({"examples_grad": 20000, "epochs": 2.0})  # 10000 cases per epoch
        (tmp_path / str(index) / "summary.json").write_text(json.dumps(summary))
        _metrics(tmp_path / str(index), slope)  # evaluations at updates 5..20, 0.1 s and 1000 cases per update
    main([str(tmp_path), "--layout", "sgn", "--at-seconds", "1.2,0.1", "--at-epochs", "1", "--format", "csv"])
    import csv
    row = list(csv.DictReader(capsys.readouterr().out.splitlines()))[0]
    assert float(row["metric @1.2s"]) == pytest.approx(0.5 / 10), "the last evaluation by 1.2 s: update 10"
    assert row["metric @0.1s"] == "", "no evaluation yet"
    assert float(row["metric @1ep"]) == pytest.approx(0.5 / 10), "one epoch = 10 updates of 1000 cases"


def test_runs_of_the_two_task_definitions_are_never_averaged_together(tmp_path):
    _summary(tmp_path / "release", "addition_T30", "hf", True, 1000.0)
    _summary(tmp_path / "hfrun", "addition_T30", "hf", True, 5000.0)
    _summary(tmp_path / "old", "addition_T30", "hf", True, 7000.0)
    for name, protocol in (("hfrun", "hfrun"), ("old", None)):  # a summary from before task.protocol has none
        path = tmp_path / name / "summary.json"
        summary = json.loads(path.read_text())
        if protocol:
            summary["task_protocol"] = protocol
        else:
            del summary["task_protocol"]
        path.write_text(json.dumps(summary))
    _summary(tmp_path / "configured", "addition_T30", "hf", True, 1000.0)  # no task_protocol, a config saying release
    path = tmp_path / "configured" / "summary.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "task_protocol"}))
    (tmp_path / "configured" / ".hydra").mkdir()
    (tmp_path / "configured" / ".hydra" / "config.yaml").write_text("task:\n  protocol: release\n")
    _summary(tmp_path / "mnist", "mnist", "hf", False, None)
    table = {(r["task"], r["solver"]): r for r in rows(collect([tmp_path]))}
    assert table["addition_T30", "hf"]["kminibatches_to_success"] == 1.0
    assert table["addition_T30", "hf"]["runs"] == 2
    assert table["addition_T30", "hf task.protocol=hfrun"]["kminibatches_to_success"] == 6.0
    assert ("mnist", "hf") in table
