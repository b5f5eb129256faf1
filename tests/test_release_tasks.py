"""The pathological tasks as Sutskever's release defines them (task.protocol=release).

Expected values are written out from the release's definitions (positions at T = 100 are f(x) = x, at T = 30
f(x) = ⌊0.3x⌋) or recomputed from the generated inputs; the variable-length curvature is checked against a
second implementation that runs every sequence on its own, cut at its target step.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call

from hfrun.curvature import CurvatureOperator
from hfrun.losses import SquaredError
from hfrun.models.rnn import RNN
from hfrun.tasks import pathological as P
from hfrun.tasks.base import Batch

CLASSES = {"addition": P.Addition, "multiplication": P.Multiplication, "xor": P.Xor,
           "temporal_order": P.TemporalOrder, "temporal_order3": P.TemporalOrder3,
           "permutation": P.RandomPermutation, "memorization5": P.Memorization5, "memorization20": P.Memorization20}


def release_task(stem: str, T: int = 100, seed: int = 0, **kwargs) -> P.PathologicalTask:
    return CLASSES[stem](name=f"{stem}_T{T}", T=T, seed=seed, device="cpu", dtype=torch.float32,
                         protocol="release", **kwargs)


def target_steps(batch: Batch) -> torch.Tensor:
    """(B,) the one step per sequence that the mask marks."""
    assert torch.equal(batch.mask.sum(1), torch.ones(batch.size)), "one target step per sequence"
    return batch.mask.argmax(1)


# ---------------------------------------------------------------- layouts, written out per task

# stem, T: (target steps L, array length, first operand window [low, high), second operand window)
MARKED = {("addition", 100): (range(100, 110), 110, (1, 10), (10, 50)),
          ("addition", 30): (range(30, 33), 33, (0, 3), (3, 15)),
          ("multiplication", 100): (range(100, 110), 110, (1, 10), (10, 50)),
          ("xor", 100): (range(50, 55), 55, (1, 10), (15, 25)),
          ("xor", 30): (range(15, 16), 16, (0, 3), (4, 7))}


@pytest.mark.parametrize("stem,T", sorted(MARKED))
def test_marked_pair_layout_per_sequence_lengths_and_cues(stem, T):
    lengths, steps, (first_low, first_high), (second_low, second_high) = MARKED[(stem, T)]
    batch = release_task(stem, T).train_stream().next(3000)
    assert batch.inputs.shape == (3000, steps, 2) and batch.targets.shape == (3000, steps, 1)
    L = target_steps(batch)
    assert set(L.tolist()) == set(lengths), "every sequence draws its own target step; all of them occur"
    values, markers = batch.inputs[..., 0], batch.inputs[..., 1]
    rows = torch.arange(3000)
    assert torch.equal(markers[rows, L - 3], -torch.ones(3000)), "a prediction comes: −1 three steps before L"
    ones = (markers == 1).nonzero()
    assert len(ones) == 2 * 3000
    first, second = ones[0::2, 1], ones[1::2, 1]
    assert first.min() == first_low and first.max() == first_high - 1
    assert second.min() == second_low and second.max() == second_high - 1
    start_cue = first > 0
    assert (markers[start_cue, 0] == -1).all(), "the start cue is −1 unless the first operand is on step 0"
    assert int((markers == -1).sum()) == 3000 + int(start_cue.sum())
    a, b = values[rows, first], values[rows, second]
    expected = {"addition": a + b, "multiplication": a * b, "xor": (a != b).float()}[stem]
    assert torch.equal(batch.targets[rows, L, 0], expected)
    assert (batch.targets[..., 0] * (1 - batch.mask) == 0).all()
    if stem == "xor":
        assert set(values.unique().tolist()) == {0.0, 1.0}
    else:
        assert 0 <= float(values.min()) and float(values.max()) < 1


@pytest.mark.parametrize("stem,windows,cue_before_target",
                         [("temporal_order", [(1, 10), (40, 50)], 1),
                          ("temporal_order3", [(1, 10), (30, 40), (50, 60)], 0)])
def test_temporal_order_layout_cues_and_balanced_classes(stem, windows, cue_before_target):
    batch = release_task(stem).train_stream().next(800)
    classes = 2 ** len(windows)
    symbols = batch.inputs.argmax(-1)
    assert batch.inputs.shape == (800, 110, 8) and torch.equal(batch.inputs.sum(-1), torch.ones(800, 110))
    L = target_steps(batch)
    assert set(L.tolist()) == set(range(100, 110))
    rows = torch.arange(800)
    assert (symbols[:, 0] == P.TemporalOrder.START).all()
    assert (symbols[rows, L - cue_before_target] == P.TemporalOrder.END).all()
    relevant = (symbols == 4) | (symbols == 5)
    assert (relevant.sum(1) == len(windows)).all()
    label = torch.zeros(800, dtype=torch.long)
    for low, high in windows:  # closed windows
        inside = relevant[:, low : high + 1]
        assert (inside.sum(1) == 1).all()
        position = low + inside.int().argmax(1)
        label = 2 * label + (symbols[rows, position] == 5).long()
    assert torch.equal(batch.targets[rows, L], label)
    assert torch.equal(label, rows % classes), "the b-th sequence has class b mod classes: balanced"
    assert torch.equal(torch.bincount(label), torch.full((classes,), 800 // classes))


def test_permutation_fixed_length_balanced_first_symbol_scored_last():
    task = release_task("permutation", T=30)
    batch = task.train_stream().next(10)
    assert batch.inputs.shape == (10, 30, 100) and torch.equal(batch.mask, torch.ones(10, 30))
    symbols = batch.inputs.argmax(-1)
    assert torch.equal(symbols[:, 0], torch.arange(10) % 2)
    assert ((symbols[:, 1:] >= 2) & (symbols[:, 1:] < 100)).all()
    assert torch.equal(batch.targets[:, :-1], symbols[:, 1:]) and torch.equal(batch.targets[:, -1], symbols[:, 0])
    outputs = torch.nn.functional.one_hot(batch.targets, 100).float()
    outputs[:, :-1] = 0  # wrong everywhere but on the last step: still correct
    assert int(task.metric_sum(outputs, batch)) == 0
    outputs[3, -1] = torch.nn.functional.one_hot(1 - batch.targets[3, -1], 100).float()
    assert int(task.metric_sum(outputs, batch)) == 1


def test_memorization5_batch_holds_all_32_sequences_and_counts_as_one_minibatch():
    task = release_task("memorization5", T=30)
    assert task.published_minibatch == 32 and task.lengths() == range(29, 30)
    assert release_task("memorization20", T=30).published_minibatch == 1000
    batch = task.train_stream().next(32)
    symbols = batch.inputs.argmax(-1)
    assert batch.inputs.shape == (32, 30, 4) and torch.equal(batch.mask, torch.ones(32, 30))
    data = symbols[:, :5]
    as_numbers = (data * torch.tensor([16, 8, 4, 2, 1])).sum(1)
    assert torch.equal(as_numbers, torch.arange(32)), "each of the 2^5 sequences once, in order"
    assert (symbols[:, 5:24] == 2).all() and (symbols[:, 24] == 3).all() and (symbols[:, 25:] == 2).all()
    assert (batch.targets[:, :25] == 2).all() and torch.equal(batch.targets[:, 25:], data)
    ten = task.train_stream().next(320)  # the gradient batch: ten copies of the 32
    assert torch.equal(ten.inputs.view(10, 32, 30, 4), batch.inputs.expand(10, -1, -1, -1))
    small = task.train_stream().next(5)  # a batch too small for all 32: random sequences
    assert small.inputs.shape == (5, 30, 4)


def test_memorization_release_scores_every_step_blanks_included():
    task = release_task("memorization20", T=30)
    batch = task.train_stream().next(4)
    outputs = torch.nn.functional.one_hot(batch.targets, task.output_size).float()
    assert int(task.metric_sum(outputs, batch)) == 0
    outputs[2, 7] = torch.nn.functional.one_hot(torch.tensor(0), task.output_size).float()  # a blank step wrong
    assert int(task.metric_sum(outputs, batch)) == 1
    earlier = CLASSES["memorization20"](name="m", T=30, seed=0, device="cpu", dtype=torch.float32)
    hfrun_batch = earlier.train_stream().next(4)
    outputs = torch.nn.functional.one_hot(hfrun_batch.targets, task.output_size).float()
    outputs[2, 7] = torch.nn.functional.one_hot(torch.tensor(0), task.output_size).float()
    assert int(earlier.metric_sum(outputs, hfrun_batch)) == 0, "hfrun's definition scores the last K steps only"


def test_zero_one_error_reads_each_sequence_at_its_own_target_step():
    task = release_task("addition", T=30)
    batch = task.train_stream().next(6)
    L = target_steps(batch)
    outputs = torch.full_like(batch.targets, 5.0)  # wrong everywhere...
    outputs[torch.arange(6), L] = batch.targets[torch.arange(6), L] + 0.039  # ...but at the target step
    assert int(task.metric_sum(outputs, batch)) == 0
    outputs[4, L[4]] += 0.002
    assert int(task.metric_sum(outputs, batch)) == 1


# ---------------------------------------------------------------- held-out set, stream, arguments


def test_held_out_sequences_take_every_target_step_in_turn():
    task = release_task("addition", T=100, eval_sequences=1000, eval_batch_size=64)
    batches = task.eval_batches()
    steps = torch.cat([target_steps(batch) for batch in batches])
    assert torch.equal(steps, 100 + torch.arange(1000) % 10)
    assert {batch.inputs.shape[1] for batch in batches} == {110}, "one shape: one trace for the whole set"
    again = release_task("addition", T=100, eval_sequences=1000, eval_batch_size=64).eval_batches()
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(batches, again, strict=True))


def test_release_stream_resumes_exactly():
    stream = release_task("temporal_order3", T=30).train_stream()
    stream.next(9)
    state = stream.state_dict()
    expected = stream.next(9)
    resumed = release_task("temporal_order3", T=30).train_stream()
    resumed.load_state_dict(state)
    got = resumed.next(9)
    assert torch.equal(expected.inputs, got.inputs) and torch.equal(expected.targets, got.targets)


def test_protocol_and_T_are_checked():
    with pytest.raises(ValueError, match="task.protocol must be one of release, hfrun"):
        CLASSES["addition"](name="a", T=30, seed=0, device="cpu", dtype=torch.float32, protocol="paper")
    with pytest.raises(ValueError, match=r"no valid layout at T=18.*Every T >= 20 works"):
        release_task("xor", T=18)  # [f(50), f(55)) = [9, 9)
    assert release_task("xor", T=19).lengths() == range(9, 10)  # [9, 10): 19 works, though below 20
    with pytest.raises(ValueError, match=r"no valid layout at T=10.*Every T >= 11 works"):
        release_task("memorization5", T=10)
    with pytest.raises(ValueError, match=r"no valid layout at T=20.*Every T >= 21 works"):
        release_task("memorization20", T=20)
    with pytest.raises(ValueError, match="no valid layout at T=9"):
        release_task("addition", T=9)  # [f(1), f(10)) = [0, 0)
    for stem, task_class in CLASSES.items():  # every T from the smallest guaranteed one gives well-formed batches
        T = task_class(name="x", T=40, seed=0, device="cpu", dtype=torch.float32, protocol="release").release_min_T
        for length in (T, T + 1, T + 7):
            batch = release_task(stem, T=length).train_stream().next(40)
            assert torch.isfinite(batch.inputs).all() and batch.mask.sum() >= 40


def test_held_out_set_holds_every_target_step_with_every_class_and_every_sequence_evenly():
    task = release_task("temporal_order3", T=100)
    pairs = set()
    for batch in task.eval_batches():
        L = target_steps(batch)
        pairs |= set(zip(L.tolist(), batch.targets[torch.arange(batch.size), L].tolist()))
    assert pairs == {(L, label) for L in range(100, 110) for label in range(8)}
    memorized = torch.cat([batch.inputs.argmax(-1)[:, :5] for batch in release_task("memorization5", T=30)
                           .eval_batches()])
    counts = torch.bincount((memorized * torch.tensor([16, 8, 4, 2, 1])).sum(1), minlength=32)
    assert int(counts.min()) == 2000 // 32 and int(counts.max()) == 2000 // 32 + 1


# ---------------------------------------------------------------- variable length through model and curvature


def test_steps_after_the_target_change_neither_loss_nor_curvature():
    """The RNN is causal, so each sequence is its own prefix up to L: the masked loss and the GGN product of a
    release batch equal those of a second implementation that runs every sequence alone, cut at its target
    step, in float64 (dense J_bᵀ H J_b summed per sequence)."""
    torch.manual_seed(5)
    task = CLASSES["addition"](name="a", T=20, seed=3, device="cpu", dtype=torch.float64, protocol="release")
    batch = task.train_stream().next(5)
    model = RNN(2, 1, hidden_size=4, impl="analytic").double()
    loss, damping = SquaredError(), 0.1
    params = {name: p.detach() for name, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    shapes = [(name, p.shape, p.numel()) for name, p in params.items()]

    def output_at_target(flat_params: torch.Tensor, case: int) -> torch.Tensor:
        unflat, offset = {}, 0
        for name, shape, count in shapes:
            unflat[name] = flat_params[offset : offset + count].view(shape)
            offset += count
        L = int(batch.mask[case].argmax())
        cut = batch.inputs[case : case + 1, : L + 1]  # the sequence alone, up to its target step
        return functional_call(model, unflat, (cut,))[0, -1]

    expected = damping * torch.eye(flat.numel(), dtype=torch.float64)
    cut_loss = 0.0
    for case in range(batch.size):
        J = jacobian(lambda p: output_at_target(p, case), flat)  # (1, P); the output Hessian of ½(z−y)² is 1
        expected += J.T @ J / batch.size
        L = int(batch.mask[case].argmax())
        cut_loss += 0.5 * float((output_at_target(flat, case) - batch.targets[case, L]).square().sum()) / batch.size
    assert float(loss(model(batch.inputs).detach(), batch.targets, batch.mask)) == pytest.approx(cut_loss, rel=1e-12)
    for jv_method in ("traced", "jvp"):
        operator = CurvatureOperator(model, loss, batch, damping=damping, jv_method=jv_method)
        columns = [operator.mv(column) for column in torch.eye(flat.numel(), dtype=torch.float64)]
        torch.testing.assert_close(torch.stack(columns, 1), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the release's RNN: no biases, a learned h_0


@pytest.mark.parametrize("impl", ["analytic", "loop", "fused"])
def test_rnn_without_biases_and_with_a_learned_initial_state_against_a_hand_loop(impl):
    torch.manual_seed(7)
    model = RNN(3, 2, hidden_size=5, impl=impl, bias=False, initial_state="learned").double()
    assert sorted(name for name, _ in model.named_parameters()) == [
        "initial_state", "readout.weight", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    with torch.no_grad():
        model.initial_state.copy_(torch.randn(5))
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    hidden, states, preactivations = model.initial_state.expand(4, -1), [], []
    for t in range(6):
        a = x[:, t] @ model.rnn.weight_ih_l0.T + hidden @ model.rnn.weight_hh_l0.T
        hidden = torch.tanh(a)
        states.append(hidden)
        preactivations.append(a)
    expected = torch.stack(states, 1) @ model.readout.weight.T
    z, a = model.forward_with_preactivations(x)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, torch.stack(preactivations, 1), rtol=1e-12, atol=1e-12)
    gradient = torch.autograd.grad(z.square().sum() + a.sin().sum(), model.initial_state)[0]
    reference = torch.autograd.grad(expected.square().sum() + torch.stack(preactivations, 1).sin().sum(),
                                    model.initial_state)[0]
    torch.testing.assert_close(gradient, reference, rtol=1e-10, atol=1e-12)


def test_a_learned_initial_state_starts_where_initial_state_std_draws_it_after_the_weights():
    torch.manual_seed(3)
    zero_start = RNN(2, 1, hidden_size=4000, bias=False, initial_state="learned")
    torch.manual_seed(3)
    drawn = RNN(2, 1, hidden_size=4000, bias=False, initial_state="learned", initial_state_std=0.258)
    assert torch.count_nonzero(zero_start.initial_state) == 0
    assert abs(drawn.initial_state.mean().item()) < 0.02  # 4000 draws: the mean's sd is 0.004
    assert abs(drawn.initial_state.std().item() - 0.258) < 0.01  # and the sd's about 0.003
    for (name, weight), (_, same) in zip(zero_start.named_parameters(), drawn.named_parameters()):
        if name != "initial_state":  # h_0 is drawn last: the weights are those of the zero start
            assert torch.equal(weight, same), name


@pytest.mark.parametrize("settings, message", [
    (dict(initial_state_std=0.1), "set model.initial_state=learned"),
    (dict(initial_state="learned", initial_state_std=-1.0), "initial_state_std must be finite and >= 0"),
    (dict(initial_state="learned", initial_state_std=float("nan")), "initial_state_std must be finite and >= 0"),
])
def test_a_bad_initial_state_std_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RNN(2, 1, hidden_size=4, **settings)


@pytest.mark.parametrize("impl", ["analytic", "loop"])
def test_curvature_of_the_release_rnn_matches_dense_with_structural_damping(impl):
    from test_curvature import assert_close_matrices, dense_ggn, operator_matrix, parameter_dict

    torch.manual_seed(8)
    task = CLASSES["addition"](name="a", T=10, seed=2, device="cpu", dtype=torch.float64, protocol="release")
    batch = task.train_stream().next(4)
    model = RNN(2, 1, hidden_size=4, bias=False, initial_state="learned", impl=impl).double()
    with torch.no_grad():
        model.initial_state.copy_(0.5 * torch.randn(4))
    loss, damping, mu = SquaredError(), 0.4, 0.3
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def preactivations_by_hand(flat: torch.Tensor) -> torch.Tensor:
        p = parameter_dict(model, flat)
        hidden, preactivations = p["initial_state"].expand(batch.size, -1), []
        for t in range(batch.inputs.shape[1]):
            a = batch.inputs[:, t] @ p["rnn.weight_ih_l0"].T + hidden @ p["rnn.weight_hh_l0"].T
            hidden = torch.tanh(a)
            preactivations.append(a)
        return torch.stack(preactivations, 1)

    J_a = jacobian(lambda t: preactivations_by_hand(t).reshape(-1), theta)
    H_S = torch.diag((1 - torch.tanh(preactivations_by_hand(theta)).square()).reshape(-1) / batch.size)
    expected = (dense_ggn(model, loss, batch) + damping * torch.eye(theta.numel(), dtype=torch.float64)
                + mu * damping * J_a.T @ H_S @ J_a)
    for jv_method in ("traced", "jvp"):
        operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu,
                                     jv_method=jv_method)
        assert_close_matrices(operator_matrix(operator), expected)
