"""`make bench` runs end to end (at a tiny scale) and prints every column the issue names."""
from __future__ import annotations

import pytest
import torch

from hfrun import bench
from standins import write_idx_dataset

COLUMNS = ["workload", "grad_ms", "gvp_ms", "gvp/grad", "cg_iter_ms", "cg_overhead", "setup_ms", "trace_ms", "hf10_ms",
           "peer10_ms", "hf10/peer", "hf_cg_iters"]


def test_measure_gives_every_figure_for_a_workload():
    workload = bench.workloads(torch.device("cpu"), 0.005)[0]
    row = bench.measure(workload, torch.device("cpu"), repeats=1)
    assert row["jv_method_used"] == "traced"
    for column in COLUMNS[1:]:
        assert row[column] > 0, column
    assert row["hf_cg_iters"] <= bench.HF_CG_ITERS


@pytest.mark.slow
def test_bench_prints_a_row_per_workload(capsys):
    bench.main(["--device", "cpu", "--scale", "0.005", "--repeats", "1", "--no-compiled"])
    out = capsys.readouterr().out
    for column in COLUMNS:
        assert column in out
    for name in ("MLP 784-256-256-10, B5000 (traced)", "autoencoder", "RNN-100 T100 B1000, loop (traced)",
                 "SGN MLP 784-20-20-20-10", "ratio_cg3", "analytic, with pre-activations",
                 "nn.RNN", "analytic (linearize)", "analytic (double_vjp)", "plain-loop model (jvp)"):
        assert name in out


def test_compare_jv_methods_on_a_configured_task(capsys):
    bench.main(["--task", "linreg", "--updates", "2"])
    out = capsys.readouterr().out
    assert "jvp: updates" in out and "traced: updates" in out and "update 1:" in out
    assert "ms per 1000-sequence minibatch" in out


def test_compare_another_key_on_a_pathological_task(capsys):
    totals = bench.compare_on_task("temporal_order_T30", 1, "model.impl", ("loop", "analytic"))
    assert set(totals) == {"loop", "analytic"} and all(t["examples"] > 0 for t in totals.values())
    assert "model.impl=" in capsys.readouterr().out


def test_reference_update_solves_least_squares_with_enough_cg_steps():
    """The peer's HF update (torch.func, no trace): with as many CG steps as parameters and tiny λ it lands on
    the least-squares optimum, whose loss is known in closed form."""
    torch.manual_seed(0)
    inputs = torch.randn(50, 4, dtype=torch.float64)
    targets = inputs @ torch.randn(4, 1, dtype=torch.float64) + 0.1 * torch.randn(50, 1, dtype=torch.float64)
    model = torch.nn.Linear(4, 1).double()
    design = torch.cat([inputs, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution
    optimum = bench.SquaredError()(design @ solution, targets, None)
    value = bench.reference_hf_update(model, bench.SquaredError(), bench.Batch(inputs, targets), cg_iters=5,
                                      damping=1e-12)
    assert value == pytest.approx(float(optimum), rel=1e-8)


def test_rnn_gradient_table_holds_each_implementation_against_the_plain_loop_doing_the_same_work(capsys,
                                                                                                monkeypatch):
    ratios = bench.rnn_gradient_table(torch.device("cpu"), 0.005, repeats=1)
    assert ratios["plain loop"] == ratios["plain loop, with pre-activations"] == 1.0
    assert all(r > 0 for r in ratios.values())
    assert "analytic, with pre-activations" in capsys.readouterr().out
    # Each row's time is the order it runs in a round (1, 2, ...): the ratios say which reference each row has.
    calls = iter(range(1, 1000))
    monkeypatch.setattr(bench, "elapsed_ms", lambda work, device: (work(), next(calls) % 6 or 6)[1])
    ratios = bench.rnn_gradient_table(torch.device("cpu"), 0.005, repeats=1)
    assert ratios == {"plain loop": 1, "plain loop, with pre-activations": 1, "analytic": 3,
                      "analytic, with pre-activations": 2, "loop": 5, "loop, with pre-activations": 3}


def test_the_plain_loop_yardstick_returns_the_pre_activations_of_its_outputs():
    torch.manual_seed(0)
    plain, inputs = bench.PlainLoopRNN(2, 5, 1), torch.randn(3, 4, 2)
    outputs, preactivations = plain.forward_with_preactivations(inputs)
    assert torch.allclose(outputs, plain.readout(torch.tanh(preactivations)))
    assert torch.allclose(preactivations[:, 0], plain.input_layer(inputs[:, 0]))  # h_0 = 0
    assert torch.allclose(preactivations[:, 1], plain.input_layer(inputs[:, 1])
                          + plain.recurrent(torch.tanh(preactivations[:, 0])))
    assert torch.equal(plain(inputs), outputs)


def test_the_table_has_compiled_rows_only_when_asked():
    def methods(compiled):
        return [(w.name, w.jv_method) for w in bench.workloads(torch.device("cpu"), 0.005, compiled)
                if w.jv_method == "compiled"]
    assert methods(False) == []
    assert methods(True) == [("tanh RNN-100 T100 B1000, analytic", "compiled"),
                             ("tanh RNN-100 T100 B1000, analytic, structural damping", "compiled")]


def test_memory_probe_reports_a_peak_for_each_kind_of_work():
    for what in ("gradient", "setup", "product"):
        assert bench.peak_memory_mib(5, what, "jvp", 0.03) >= 0


def test_bdhf_memory_probe_reports_a_peak_for_each_kind_of_product():
    for what in ("batched", "cut"):  # "full" and "looped" take the batched branch
        assert bench.bdhf_peak_memory_mib("autoencoder", what, cases=8) >= 0


def test_data_table_splits_an_epoch_into_data_handling_and_gradients(tmp_path, capsys):
    write_idx_dataset(tmp_path / "mnist", train=300, test=50)
    rows = bench.data_table(("mnist", "sine_f10"), (f"task.data_dir={tmp_path}", "task.verify=false"), batch_size=100)
    assert [row["task"] for row in rows] == ["mnist", "sine_f10"]
    assert rows[0]["cases"] == 300 and rows[1]["cases"] == 7000
    for row in rows:
        assert row["data_ms"] > 0 and row["compute_ms"] > 0 and 0 < row["data_share"] < 1
    assert "data_share" in capsys.readouterr().out


def test_sgn_rows_give_the_update_to_gradient_ratio():
    name, model, loss, batch = bench.sgn_workloads(torch.device("cpu"), 0.01)[1]
    row = bench.sgn_measure(model, loss, batch, torch.device("cpu"), repeats=1)
    for iters in bench.SGN_CG_ITERS:
        assert row[f"update_ms_cg{iters}"] > 0 and row[f"ratio_cg{iters}"] > 0


def test_bdhf_rows_compare_an_all_blocks_product_with_a_full_product(capsys):
    rows = bench.bdhf_table(torch.device("cpu"), 0.005, repeats=1)
    assert [row["blocks"] for row in rows] == [8, 4, 2]  # one block per layer
    for row in rows:
        assert row["full_ms"] > 0 and row["batched/full"] > 0 and row["looped/full"] > 0 and row["cut/full"] > 0
    assert "batched/full" in capsys.readouterr().out
