"""Pathological tasks (generators, held-out set, 0-1 error), the tanh RNN, and their configs.

Expected values are recomputed independently from the generated inputs or
written out from the task definitions (H&S 1997, M&S 2011), never taken from
an earlier run of the code.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jvp

from hfrun.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError
from hfrun.models.rnn import RNN
from hfrun.tasks.base import Batch
from hfrun.tasks import pathological as P

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASK_CLASSES = {
    "addition": P.Addition, "multiplication": P.Multiplication, "xor": P.Xor,
    "temporal_order": P.TemporalOrder, "temporal_order3": P.TemporalOrder3,
    "permutation": P.RandomPermutation, "memorization5": P.Memorization5, "memorization20": P.Memorization20,
}
# (input_size, output_size, loss) from the task definitions
TASK_SHAPES = {
    "addition": (2, 1, SquaredError), "multiplication": (2, 1, SquaredError), "xor": (2, 1, SigmoidCrossEntropy),
    "temporal_order": (8, 4, SoftmaxCrossEntropy), "temporal_order3": (8, 8, SoftmaxCrossEntropy),
    "permutation": (100, 100, SoftmaxCrossEntropy), "memorization5": (4, 3, SoftmaxCrossEntropy),
    "memorization20": (7, 6, SoftmaxCrossEntropy),
}


def make_task(stem: str, T: int = 100, seed: int = 0, **kwargs) -> P.PathologicalTask:
    return TASK_CLASSES[stem](name=f"{stem}_T{T}", T=T, seed=seed, device="cpu", dtype=torch.float32, **kwargs)


def batch_at(task: P.PathologicalTask, length: int, batch_size: int = 4000, seed: int = 1) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return task.make_batch(batch_size, length, generator)


# ---------------------------------------------------------------- shared batch format


@pytest.mark.parametrize("stem", sorted(TASK_CLASSES))
def test_batch_format_and_length_range(stem):
    T = 50
    task = make_task(stem, T=T)
    inputs_expected, outputs_expected, loss_class = TASK_SHAPES[stem]
    assert (task.input_size, task.output_size) == (inputs_expected, outputs_expected)
    assert isinstance(task.loss, loss_class)
    assert task.metric_name == "error" and task.success_threshold == 0.001
    stream = task.train_stream()
    offset = task.memory_length if isinstance(task, P.NoiselessMemorization) else 0
    lengths = set()
    for _ in range(40):
        batch = stream.next(3)
        batch_size, length, channels = batch.inputs.shape
        lengths.add(length - offset)
        assert (batch_size, channels) == (3, task.input_size)
        assert batch.inputs.dtype == torch.float32 and batch.mask.dtype == torch.float32
        assert batch.mask.shape == (3, length)
        if isinstance(task.loss, SoftmaxCrossEntropy):
            assert batch.targets.shape == (3, length) and batch.targets.dtype == torch.long
            assert 0 <= int(batch.targets.min()) and int(batch.targets.max()) < task.output_size
        else:
            assert batch.targets.shape == (3, length, 1)
    assert lengths <= set(range(T, T + T // 10)) and len(lengths) > 1


def test_generation_of_1000_sequences_of_length_up_to_220_works():
    for stem in TASK_CLASSES:
        task = make_task(stem, T=200)
        batch = task.train_stream().next(1000)
        assert batch.size == 1000 and 200 <= batch.inputs.shape[1] < 220 + 10
        assert torch.isfinite(batch.inputs).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="T >= 10"):
        make_task("addition", T=5)
    with pytest.raises(ValueError, match="T >= 11"):
        make_task("memorization20", T=10)
    with pytest.raises(ValueError, match="eval_sequences must be at least 1000"):
        make_task("xor", eval_sequences=999)
    task = make_task("temporal_order")
    batch = task.eval_batches()[0]
    with pytest.raises(ValueError, match="outputs have shape"):
        task.metric_sum(torch.zeros(batch.size, batch.inputs.shape[1], 3), batch)


# ---------------------------------------------------------------- marked-pair tasks


def marker_positions(batch: Batch) -> torch.Tensor:
    markers = batch.inputs[..., 1]
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    assert (markers.sum(1) == 2).all(), "exactly two marked steps per sequence"
    return markers.nonzero()[:, 1].view(-1, 2)  # sorted: (first, second)


@pytest.mark.parametrize("length", [30, 55, 100, 219])
@pytest.mark.parametrize("stem", ["addition", "multiplication", "xor"])
def test_markers_lie_in_the_first_tenth_and_before_the_half(stem, length):
    batch = batch_at(make_task(stem, T=30), length)
    first, second = marker_positions(batch).unbind(1)
    assert (first >= 0).all() and (first < length / 10).all()
    assert (second >= length / 10).all() and (second < length / 2).all()
    # the windows are covered, not just respected: every integer position in [0, L/10) and [L/10, L/2)
    assert int(first.min()) == 0 and int(first.max()) == math.ceil(length / 10) - 1
    assert int(second.min()) == math.ceil(length / 10) and int(second.max()) == math.ceil(length / 2) - 1


@pytest.mark.parametrize("stem", ["addition", "multiplication"])
def test_value_targets_are_recomputed_from_the_marked_values(stem):
    batch = batch_at(make_task(stem), 104)
    values = batch.inputs[..., 0]
    assert (values >= 0).all() and (values < 1).all()
    marked = values[batch.inputs[..., 1] == 1].view(-1, 2)
    expected = marked.sum(1) if stem == "addition" else marked.prod(1)
    torch.testing.assert_close(batch.targets[:, -1, 0], expected)
    assert (batch.targets[:, :-1] == 0).all()
    assert (batch.mask[:, -1] == 1).all() and (batch.mask[:, :-1] == 0).all()


def test_xor_target_is_the_xor_of_the_marked_bits_and_balanced():
    batch = batch_at(make_task("xor"), 100)
    bits = batch.inputs[..., 0]
    assert set(bits.unique().tolist()) == {0.0, 1.0}
    marked = bits[batch.inputs[..., 1] == 1].view(-1, 2).long()
    torch.testing.assert_close(batch.targets[:, -1, 0], (marked[:, 0] ^ marked[:, 1]).float())
    assert abs(float(batch.targets[:, -1].mean()) - 0.5) < 0.04


# ---------------------------------------------------------------- temporal order

A, X, Y, E, B_END = 0, 4, 5, 6, 7
# windows written out from the REFERENCE table at L = 100 and scaled by hand to L = 200
WINDOWS = {
    ("temporal_order", 100): [(10, 20), (50, 60)],
    ("temporal_order", 200): [(20, 40), (100, 120)],
    ("temporal_order3", 100): [(10, 20), (33, 43), (66, 76)],
    ("temporal_order3", 200): [(20, 40), (66, 86), (132, 152)],
}


@pytest.mark.parametrize("stem,length", sorted(WINDOWS))
def test_temporal_order_symbols_windows_and_class(stem, length):
    batch = batch_at(make_task(stem), length)
    assert (batch.inputs.sum(-1) == 1).all(), "one-hot inputs"
    symbols = batch.inputs.argmax(-1)
    assert (symbols[:, 0] == E).all() and (symbols[:, -1] == B_END).all()
    assert (symbols[:, 1:-1] <= Y).all()
    relevant = (symbols == X) | (symbols == Y)
    windows = WINDOWS[(stem, length)]
    assert (relevant.sum(1) == len(windows)).all()
    positions = relevant.nonzero()[:, 1].view(-1, len(windows))
    for slot, (low, high) in enumerate(windows):
        assert int(positions[:, slot].min()) == low and int(positions[:, slot].max()) == high
    is_y = (symbols.gather(1, positions) == Y).long()
    expected = sum(is_y[:, slot] << (len(windows) - 1 - slot) for slot in range(len(windows)))
    assert torch.equal(batch.targets[:, -1], expected)  # XX → 0, XY → 1, YX → 2, YY → 3
    counts = torch.bincount(expected, minlength=2 ** len(windows)).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.2, "classes roughly uniform"
    distractors = symbols[:, 1:-1][~relevant[:, 1:-1]]
    assert set(distractors.unique().tolist()) == {0, 1, 2, 3}


# ---------------------------------------------------------------- random permutation


def test_permutation_targets_are_the_next_symbol_and_the_last_repeats_the_first():
    batch = batch_at(make_task("permutation"), 103, batch_size=500)
    symbols = batch.inputs.argmax(-1)
    assert (batch.inputs.sum(-1) == 1).all()
    assert (symbols[:, 0] <= 1).all() and set(symbols[:, 0].unique().tolist()) == {0, 1}
    assert (symbols[:, 1:] >= 2).all()
    assert torch.equal(batch.targets[:, :-1], symbols[:, 1:])
    assert torch.equal(batch.targets[:, -1], symbols[:, 0])
    assert (batch.mask == 1).all(), "the loss covers every step"


# ---------------------------------------------------------------- memorization


@pytest.mark.parametrize("stem,memory,values", [("memorization5", 5, 2), ("memorization20", 10, 5)])
def test_memorization_layout(stem, memory, values):
    task = make_task(stem, T=30)
    batch = task.train_stream().next(2000)
    length = batch.inputs.shape[1]
    assert 30 <= length - memory < 33
    symbols = batch.inputs.argmax(-1)
    blank, go = values, values + 1
    data = symbols[:, :memory]
    assert (data < values).all()
    assert (symbols[:, length - memory - 1] == go).all()
    rest = torch.cat([symbols[:, memory:length - memory - 1], symbols[:, length - memory:]], dim=1)
    assert (rest == blank).all()
    assert (batch.targets[:, :-memory] == blank).all()
    assert torch.equal(batch.targets[:, -memory:], data)
    assert (batch.mask == 1).all()
    counts = torch.bincount(data.flatten(), minlength=values).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1


# ---------------------------------------------------------------- held-out set and stream


def flat(batches: list[Batch]) -> list[torch.Tensor]:
    return [tensor for batch in batches for tensor in (batch.inputs, batch.targets, batch.mask)]


def test_held_out_set_is_fixed_by_the_seed():
    first = make_task("temporal_order", seed=3).eval_batches()
    again = make_task("temporal_order", seed=3).eval_batches()
    other = make_task("temporal_order", seed=4).eval_batches()
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(again), strict=True))
    assert not torch.equal(first[0].inputs[:, :100], other[0].inputs[:, :100])
    train = make_task("temporal_order", seed=3).train_stream().next(1000)
    assert not torch.equal(train.inputs[:, :100], first[0].inputs[:, :100])


def test_held_out_set_size_batches_and_cache():
    task = make_task("addition", T=100, eval_sequences=2500, eval_batch_size=1000)
    batches = task.eval_batches()
    assert [batch.size for batch in batches] == [1000, 1000, 500]
    assert len({batch.inputs.shape[1] for batch in batches}) > 1
    assert task.eval_batches() is batches


@pytest.mark.parametrize("stem,T,lengths", [("addition", 200, range(200, 220)), ("temporal_order", 30, range(30, 33)),
                                            ("memorization5", 30, range(35, 38)), ("xor", 15, range(15, 16))])
def test_held_out_set_holds_every_length(stem, T, lengths):
    batches = make_task(stem, T=T).eval_batches()
    assert sum(batch.size for batch in batches) == 2000 and len(batches) == 20
    assert sorted({batch.inputs.shape[1] for batch in batches}) == list(lengths)
    generator = torch.Generator().manual_seed(0)
    assert {make_task(stem, T=T).sample_length(generator) for _ in range(400)} == set(lengths)


def test_train_stream_resumes_exactly():
    task = make_task("memorization20", T=50)
    stream = task.train_stream()
    for _ in range(3):
        stream.next(7)
    state = stream.state_dict()
    expected = [stream.next(11) for _ in range(2)]
    resumed = make_task("memorization20", T=50).train_stream()
    resumed.load_state_dict(state)
    got = [resumed.next(11) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(flat(expected), flat(got), strict=True))


# ---------------------------------------------------------------- 0-1 error on hand-made outputs


def test_addition_tolerance_is_strict_at_four_hundredths():
    task = make_task("addition")
    batch = batch_at(task, 100, batch_size=10)
    outputs = torch.randn(10, 100, 1) * 5  # steps before the last are not scored
    outputs[:, -1] = batch.targets[:, -1] + 0.039
    outputs[3, -1] = batch.targets[3, -1] - 0.041
    outputs[7, -1] = batch.targets[7, -1] + 0.041
    assert int(task.metric_sum(outputs, batch)) == 2


def test_xor_thresholds_the_sigmoid_at_one_half():
    task = make_task("xor")
    batch = batch_at(task, 100, batch_size=10)
    logits = (2 * batch.targets - 1) * 0.01  # barely on the right side of ½
    logits[5, -1] = -logits[5, -1]
    logits[:, :-1] = -logits[:, :-1]
    assert int(task.metric_sum(logits, batch)) == 1


@pytest.mark.parametrize("stem", ["temporal_order", "temporal_order3", "permutation"])
def test_last_step_argmax_decides(stem):
    task = make_task(stem)
    batch = batch_at(task, 100, batch_size=10)
    logits = torch.randn(10, 100, task.output_size)  # earlier steps: noise, not scored
    logits[:, -1] = 3 * torch.nn.functional.one_hot(batch.targets[:, -1], task.output_size)
    assert int(task.metric_sum(logits, batch)) == 0
    logits[2, -1] = logits[2, -1].roll(1)
    logits[9, -1] = logits[9, -1].roll(1)
    assert int(task.metric_sum(logits, batch)) == 2


def test_memorization_needs_every_one_of_the_last_steps():
    task = make_task("memorization20", T=30)
    batch = batch_at(task, 40, batch_size=6)
    logits = 2 * torch.nn.functional.one_hot(batch.targets, task.output_size).float()
    logits[:, :5] = logits[:, :5].roll(1, dims=-1)  # blank-target steps are not in the criterion
    assert int(task.metric_sum(logits, batch)) == 0
    logits[1, -10] = logits[1, -10].roll(1)  # first answer step of sequence 1
    logits[4, -1] = logits[4, -1].roll(1)  # last answer step of sequence 4
    logits[4, -2] = logits[4, -2].roll(1)
    assert int(task.metric_sum(logits, batch)) == 2


class Oracle(torch.nn.Module):
    """Logits that point at the held-out classes themselves: a 0-1 error of zero by construction."""

    def __init__(self, task: P.PathologicalTask):
        super().__init__()
        self.answers = {id(batch.inputs): batch.targets for batch in task.eval_batches()}
        self.output_size = task.output_size

    def forward(self, x):
        return 10 * torch.nn.functional.one_hot(self.answers[id(x)], self.output_size).to(x.dtype)


def test_evaluate_reports_the_error_and_success():
    task = make_task("temporal_order", T=30)
    metrics = task.evaluate(Oracle(task))
    assert metrics["error"] == 0.0 and task.is_solved(metrics)
    chance = task.evaluate(RNN(task.input_size, task.output_size, hidden_size=8))
    assert chance["error"] > 0.5 and not task.is_solved(chance)


# ---------------------------------------------------------------- the RNN


def test_rnn_shapes_and_argument_checks():
    model = RNN(3, 5, hidden_size=20)
    x = torch.randn(4, 9, 3)
    z, a = model.forward_with_preactivations(x)
    assert model(x).shape == z.shape == (4, 9, 5) and a.shape == (4, 9, 20)
    for kwargs, message in [({"init": "xavier"}, "model.init"), ({"impl": "cudnn"}, "model.impl"),
                            ({"hidden_size": 0}, "hidden_size"), ({"spectral_radius": -1.0}, "spectral_radius"),
                            ({"sparse_fan_in": 0}, "sparse_fan_in"), ({"input_scale": float("nan")}, "input_scale"),
                            ({"sparse_scale": "xavier"}, "model.sparse_scale")]:
        with pytest.raises(ValueError, match=message):
            RNN(3, 5, **kwargs)
    with pytest.raises(ValueError, match="inputs"):
        model(torch.randn(4, 9, 2))


def test_sparse_init_has_fifteen_nonzeros_per_unit():
    torch.manual_seed(0)
    model = RNN(2, 4, hidden_size=100)
    recurrent, inputs = model.rnn.weight_hh_l0.detach(), model.rnn.weight_ih_l0.detach()
    assert ((recurrent != 0).sum(1) == 15).all()
    assert ((inputs != 0).sum(1) == 2).all(), "capped at the fan-in size"
    assert ((model.readout.weight != 0).sum(1) == 15).all()
    for bias in (model.rnn.bias_ih_l0, model.rnn.bias_hh_l0, model.readout.bias):
        assert (bias == 0).all()
    # N(0,1)/√15 recurrent, N(0,1)/√2·0.25 input
    assert abs(float(recurrent[recurrent != 0].var()) * 15 - 1) < 0.15
    assert abs(float(inputs[inputs != 0].var()) * 2 / 0.25**2 - 1) < 0.3


def test_sparse_init_scaled_by_the_fan_in_as_sutskevers_release():
    """sparse_scale=fan_in: every non-zero N(0,1)/√15 even where a row holds fewer (Sutskever's sparsify_strict)."""
    torch.manual_seed(0)
    model = RNN(2, 4, hidden_size=400, sparse_scale="fan_in")
    recurrent, inputs = model.rnn.weight_hh_l0.detach(), model.rnn.weight_ih_l0.detach()
    assert ((recurrent != 0).sum(1) == 15).all() and ((inputs != 0).sum(1) == 2).all()
    assert abs(float(recurrent[recurrent != 0].var()) * 15 - 1) < 0.1
    assert abs(float(inputs[inputs != 0].var()) * 15 / 0.25**2 - 1) < 0.2  # 2/15 of the variance of "nonzeros"


def test_spectral_init_has_the_requested_radius():
    torch.manual_seed(1)
    model = RNN(2, 1, init="spectral", spectral_radius=1.1)
    recurrent = model.rnn.weight_hh_l0.detach().double()
    radius = torch.linalg.eigvals(recurrent).abs().max()
    assert abs(float(radius) - 1.1) < 1e-5
    assert ((recurrent != 0).sum(1) == 15).all()
    assert abs(float(model.rnn.weight_ih_l0.detach().std()) - 0.001) < 0.0003


def twin_models(**kwargs) -> tuple[RNN, RNN, RNN]:
    fused = RNN(3, 2, hidden_size=16, impl="fused", **kwargs).double()
    loop = RNN(3, 2, hidden_size=16, impl="loop", **kwargs).double()
    analytic = RNN(3, 2, hidden_size=16, impl="analytic", **kwargs).double()
    with torch.no_grad():
        for parameter in fused.parameters():  # non-zero biases so that every term is exercised
            parameter.add_(0.3 * torch.randn_like(parameter))
    loop.load_state_dict(fused.state_dict())
    analytic.load_state_dict(fused.state_dict())
    return fused, loop, analytic


def test_fused_and_loop_agree_and_preactivations_give_the_hidden_states():
    torch.manual_seed(2)
    fused, loop, analytic = twin_models()
    x = torch.randn(5, 13, 3, dtype=torch.float64)
    z_fused, a_fused = fused.forward_with_preactivations(x)
    for other in (loop, analytic):
        z_other, a_other = other.forward_with_preactivations(x)
        torch.testing.assert_close(z_fused, z_other)
        torch.testing.assert_close(a_fused, a_other)
        torch.testing.assert_close(other(x), z_fused)
    hidden = fused.hidden_states(x)
    torch.testing.assert_close(torch.tanh(a_fused), hidden)
    rnn = fused.rnn  # h_0 = 0: the first pre-activation sees only the input
    torch.testing.assert_close(a_fused[:, 0], x[:, 0] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0)
    torch.testing.assert_close(z_fused, hidden @ fused.readout.weight.T + fused.readout.bias)


def test_functional_call_and_jvp_use_the_given_parameters_in_both_implementations():
    torch.manual_seed(3)
    fused, loop, analytic = twin_models()
    x = torch.randn(4, 11, 3, dtype=torch.float64)
    params = {name: p.detach() + 0.1 for name, p in fused.named_parameters()}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    shifted = RNN(3, 2, hidden_size=16).double()
    shifted.load_state_dict(params)
    epsilon = 1e-6
    plus = {name: params[name] + epsilon * tangents[name] for name in params}
    minus = {name: params[name] - epsilon * tangents[name] for name in params}
    for model in (fused, loop, analytic):
        outputs, directional = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))
        torch.testing.assert_close(outputs, shifted(x))
        central = (functional_call(model, plus, (x,)) - functional_call(model, minus, (x,))) / (2 * epsilon)
        torch.testing.assert_close(directional, central, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- configs


def make_config_tree(root: Path) -> Path:
    """A minimal primary config with the real task and RNN configs: `model` precedes `task`."""
    shutil.copytree(CONFIGS / "task", root / "task")
    (root / "model").mkdir()
    shutil.copy(CONFIGS / "model" / "rnn.yaml", root / "model" / "rnn.yaml")
    (root / "model" / "mlp.yaml").write_text("_target_: hfrun.models.mlp.MLP\ninput_size: ???\noutput_size: ???\n")
    (root / "config.yaml").write_text("defaults:\n  - model: mlp\n  - task: ???\n  - _self_\nseed: 0\n")
    return root


def compose(config_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def test_every_task_config_composes_picks_the_rnn_and_instantiates(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    config_dir = make_config_tree(tmp_path)
    for stem, task_class in TASK_CLASSES.items():
        for T in (30, 50, 100, 200):
            config = compose(config_dir, [f"task={stem}_T{T}"])
            assert config.model._target_ == "hfrun.models.rnn.RNN"
            assert config.task.T == T and config.task.name == f"{stem}_T{T}"
            hints = config.task.solver_hints
            release_batch = 32 if stem == "memorization5" else 1000  # the release's 5-bit batch: all 32 sequences
            assert config.task.protocol == "release"
            assert (hints.batch_size, hints.gradient_batch_size) == (release_batch, 10 * release_batch)
            assert hints.curvature_batch_size == hints.chunk_size == release_batch
            task_config = OmegaConf.masked_copy(config.task, [k for k in config.task if k != "solver_hints"])
            task = instantiate(task_config, seed=0, device="cpu", dtype=torch.float32)
            assert type(task) is task_class and task.T == T and task.protocol == "release"
            assert task.published_minibatch == release_batch
    earlier = compose(config_dir, ["task=memorization5_T30", "task.protocol=hfrun"])
    assert (earlier.task.solver_hints.batch_size, earlier.task.solver_hints.gradient_batch_size) == (1000, 10000)
    model = instantiate(config.model, **task.model_sizes())
    assert model(task.train_stream().next(2).inputs).shape[-1] == task.output_size
    chosen = compose(config_dir, ["task=addition_T30", "model=mlp"])
    assert chosen.model._target_ == "hfrun.models.mlp.MLP", "model=... on the command line still wins"
    free_length = compose(config_dir, ["task=xor", "task.T=70"])
    assert free_length.task.name == "xor_T70"


@pytest.mark.skipif(not (CONFIGS / "config.yaml").exists(), reason="no primary config yet")
def test_real_primary_config_picks_the_rnn_for_a_pathological_task():
    config = compose(CONFIGS, ["task=permutation_T50"])
    assert config.model._target_ == "hfrun.models.rnn.RNN" and config.task.T == 50


# Sutskever's release (10 x 1000 gradient, 1000 curvature, μ = 0.03, 300 CG steps, no preconditioner, weight
# cost 2e-5) with the two measured departures the README gives: λ₀ = 1 and backtracking on the gradient batch.
PATHOLOGICAL_HF_DEFAULTS = {"gradient_batch_size": 10000, "curvature_batch_size": 1000, "chunk_size": 1000,
                            "backtrack_batch_size": 0, "structural_damping": 0.03, "cg_max_iters": 300,
                            "preconditioner": "none", "initial_damping": 1.0, "weight_cost": 2e-5,
                            "jv_method": "auto", "curvature": "ggn"}


@pytest.mark.parametrize("stem", sorted(TASK_CLASSES))
def test_hf_defaults_for_every_pathological_task(stem):
    for T in (30, 200):
        solver = compose(CONFIGS, [f"task={stem}_T{T}", "solver=hf"]).solver
        expected = dict(PATHOLOGICAL_HF_DEFAULTS, jv_method="auto" if T < 100 else "compiled")  # one shape per run
        if stem == "memorization5":  # the release's batch of all 32 five-bit sequences, ten of them per gradient
            expected.update(gradient_batch_size=320, curvature_batch_size=32, chunk_size=32)
        assert {key: solver[key] for key in PATHOLOGICAL_HF_DEFAULTS} == expected
    overridden = compose(CONFIGS, [f"task={stem}_T30", "solver=hf", "solver.cg_max_iters=50"]).solver
    assert overridden.cg_max_iters == 50, "the command line wins over the task's hints"


def test_analytic_recurrence_with_a_frozen_weight_and_batched_gradients():
    """The hand-written backward against autograd through the loop, with W_hh frozen, and under
    is_grads_batched (vmap over cotangents), which needs batching rules for every op it uses."""
    torch.manual_seed(4)
    _, loop, analytic = twin_models()
    for model in (loop, analytic):
        model.rnn.weight_hh_l0.requires_grad_(False)
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    cotangents = torch.randn(4, 3, 6, 2, dtype=torch.float64)
    grads = [torch.autograd.grad(model(x), [p for p in model.parameters() if p.requires_grad], cotangents,
                                 is_grads_batched=True) for model in (loop, analytic)]
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected)


def test_analytic_recurrence_writes_into_buffers_only_where_nothing_watches(monkeypatch):
    """The recurrence writes its steps into preallocated outputs (out= ops) in a plain eager forward and
    backward, and stacks steps that can be differentiated, batched or traced wherever a graph is recorded,
    a torch.func transform, vmap, a tracer or autocast watches. Either way it gives the loop's values: the
    gradients with and without the pre-activations' cotangent, the double backward (create_graph), a
    Hessian product by torch.func, a linearized product (make_fx) and an autocast forward."""
    from hfrun.models import recurrence
    decisions, writes_into_buffers = [], recurrence._writes_into_buffers

    def spy(*tensors):
        decisions.append(writes_into_buffers(*tensors))
        return decisions[-1]
    monkeypatch.setattr(recurrence, "_writes_into_buffers", spy)
    torch.manual_seed(5)
    _, loop, analytic = twin_models()
    x = torch.randn(3, 6, 3, dtype=torch.float64)

    def gradient(model, create_graph=False, preactivations=True):
        if preactivations:
            z, a = model.forward_with_preactivations(x)
            value = z.square().sum() + 0.1 * a.sin().sum()
        else:
            value = model(x).square().sum()
        return torch.autograd.grad(value, list(model.parameters()), create_graph=create_graph)

    def decided(work):
        decisions.clear()
        result = work()
        return result, list(decisions)

    for preactivations in (True, False):
        actual, seen = decided(lambda: gradient(analytic, preactivations=preactivations))
        assert seen == [True, True], "a plain forward and its backward write into buffers"
        for expected, value in zip(gradient(loop, preactivations=preactivations), actual):
            torch.testing.assert_close(value, expected)

    def second_order(model):
        first = gradient(model, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), list(model.parameters()))
    actual, seen = decided(lambda: second_order(analytic))
    # the backward whose graph is recorded stacks; the double backward is a plain one again
    assert seen == [True, False, True]
    for expected, value in zip(second_order(loop), actual):
        torch.testing.assert_close(value, expected)

    params = {name: p.detach() for name, p in analytic.named_parameters()}
    tangent = {name: torch.randn_like(p) for name, p in params.items()}

    def hessian_product(model):
        gradient_of = torch.func.grad(lambda p: functional_call(model, p, (x,)).square().sum())
        return jvp(gradient_of, (params,), (tangent,))[1]
    actual, seen = decided(lambda: hessian_product(analytic))
    # torch.func runs the forward one level down on plain tensors; the backward it differentiates stacks
    assert seen == [True, False]
    for name, value in hessian_product(loop).items():
        torch.testing.assert_close(actual[name], value)

    def linearized(model):
        return torch.func.linearize(lambda p: functional_call(model, p, (x,)), params)[1](tangent)
    actual, seen = decided(lambda: linearized(analytic))
    # linearize runs the function once as it is, then traces it under make_fx (fake tensors, a dispatch
    # mode), where writing into a buffer left the replayed tangents NaN
    assert seen == [True, False] and torch.isfinite(actual).all()
    torch.testing.assert_close(actual, linearized(loop))

    with torch.autocast("cpu", dtype=torch.bfloat16):  # out= ops are not autocast: the steps are stacked
        actual, seen = decided(lambda: analytic.float()(x.float()))
        expected = loop.float()(x.float())
    assert actual.dtype == torch.bfloat16 and seen == [False]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.05, atol=0.05)
