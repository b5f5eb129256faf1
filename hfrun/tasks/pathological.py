"""The pathological long-term-dependency tasks of Hochreiter & Schmidhuber (1997),
as used by Martens & Sutskever (2011) and Sutskever et al. (2013).

Every batch is generated on the run's device from a `torch.Generator`, with no
Python loop over sequences. Each task has two definitions, chosen by `protocol`:

  - "release": the tasks as Sutskever's released code defines them, on which M&S
    2011's Figure 3 was measured (the default of the task configs). With
    f(x) = ⌊x·T/100⌋, T being the release's length setting:
      * addition, multiplication, xor, temporal order: every sequence of a batch
        has its own target step L, drawn from [f(100), f(110)) ([f(50), f(55))
        for xor: half the nominal length). The batch array is f(110) (f(55))
        steps long, every step holds random input, and the mask marks step L,
        so a sequence is read over steps 0 … L (L + 1 steps). Cue inputs mark
        the start and announce the prediction; the marked windows are the
        release's; the classes of temporal order are balanced inside a batch
        (the b-th sequence has class b mod classes).
      * random permutation: a fixed length of f(100) steps, trained on every
        step, scored on the last; the first symbol alternates 0, 1 in a batch.
      * noiseless memorization: a fixed total length of f(100) steps, trained
        and scored on every step. With 5 bits, a batch of 32 holds each of the
        2⁵ sequences once (sequence b shows b mod 32 in binary), and M&S's
        "minibatch" is that batch of 32 (`published_minibatch`).
  - "hfrun": hfrun's earlier definitions. T is the minimum length; each batch
    draws one length L from [T, T + T//10), so a batch has no padding, and the
    target is read at the last step. Memorization has K data steps and then
    T or more constant steps. Marked windows scale with L: a window stated at
    L = 100 holds the integer positions of that real interval scaled by L/100
    (e.g. [10%, 50%) of L = 55 is positions 6 … 27).

Shared conventions:
  - inputs (B, steps, input_size) in the run's dtype; the model outputs a
    prediction at every step; `mask` (B, steps) in the run's dtype says which
    steps the loss covers. Targets are (B, steps, 1) values for squared error
    and sigmoid cross-entropy, (B, steps) class indices for softmax
    cross-entropy; where the mask is 0 they are placeholders (0).
  - The metric is the 0-1 error: the fraction of sequences that are not
    correct, where "correct" means right at every scored step (`scored`): the
    masked steps under "release" (permutation: its last step only), the last
    `scored_steps` steps under "hfrun". The task is solved when the held-out
    0-1 error falls below 0.001 (Sutskever's stopping rule).
  - The held-out set is `eval_sequences` (at least 1,000) sequences in batches
    of `eval_batch_size`, drawn once from a generator seeded with
    seed + EVAL_SEED_OFFSET and cached; `eval_seed`, when given, takes seed's
    place there, for a fresh held-out set of the same task
    (hfrun.evaluate --set task.eval_seed=N). Every possible length is held out:
    under "hfrun" the batches take the lengths in turn, under "release" the
    sequences do (the i-th held-out sequence has the i-th target step, cyclically).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from hfrun.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError
from hfrun.tasks.base import Batch, GeneratedStream, Task, make_generator

EVAL_SEED_OFFSET = 1_000_003  # the held-out generator's seed is seed + this; far from any sweep's seeds
VALUE_TOLERANCE = 0.04  # addition/multiplication: correct when |prediction − target| < this
MIN_HELD_OUT = 1000  # "solved" needs the error below 0.001 on at least this many held-out sequences


def argmax_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """(B, k, C) pre-activations vs (B, k) classes → (B, k): the argmax is the target class."""
    return outputs.argmax(-1) == targets


def within_tolerance(outputs: Tensor, targets: Tensor) -> Tensor:
    """(B, k, 1) linear outputs vs (B, k, 1) values → (B, k): |prediction − target| < 0.04."""
    return ((outputs - targets).abs() < VALUE_TOLERANCE).all(-1)


def threshold_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """(B, k, 1) pre-activations vs (B, k, 1) bits → (B, k): [sigmoid(z) > ½] equals the bit."""
    return ((outputs > 0) == (targets > 0.5)).all(-1)  # sigmoid(z) > ½ ⇔ z > 0


def first_position_from(bound_at_100: int, length: int) -> int:
    """The first integer position ≥ p·L/100, i.e. ⌈p·L/100⌉ (exact integer arithmetic)."""
    return -(-bound_at_100 * length // 100)


def last_position_upto(bound_at_100: int, length: int) -> int:
    """The last integer position ≤ p·L/100, i.e. ⌊p·L/100⌋."""
    return bound_at_100 * length // 100


def one_hot(symbols: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """(B, L) symbol indices → (B, L, classes) one-hot in `dtype`, without an int64 intermediate."""
    encoded = torch.zeros(*symbols.shape, classes, dtype=dtype, device=symbols.device)
    return encoded.scatter_(-1, symbols.unsqueeze(-1), 1.0)


def last_step_mask(batch_size: int, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B, L) mask that scores only the last step."""
    mask = torch.zeros(batch_size, length, dtype=dtype, device=device)
    mask[:, -1] = 1.0
    return mask


PROTOCOLS = ("release", "hfrun")


class PathologicalTask(Task):
    """Shared machinery: length sampling, the training stream, the held-out set, the 0-1 error.

    A subclass sets `loss`, `input_size`, `output_size`, `step_correct` (a rule
    per step, which must hold at every scored step) and implements
    `make_batch(batch_size, length, generator)` (the "hfrun" definition) and
    `release_batch(batch_size, target_steps, generator)` (the "release" one).
    """

    metric_name = "error"
    success_threshold = 0.001
    min_T = 10  # the smallest T for which every window of the "hfrun" definition is non-empty
    release_min_T = 10  # "release": every T from here on has a valid layout (release_windows_fit)
    balance_period = 1  # "release": the b-th sequence's label depends on b mod this (temporal order: classes)
    scored_steps = 1  # "hfrun": the last this many steps are scored
    # "release": target steps L ∈ [f(low), f(high)), a batch array of f(high) steps; None: a fixed length f(100)
    release_lengths_at_100: tuple[int, int] | None = (100, 110)
    step_correct: Callable[[Tensor, Tensor], Tensor]

    def __init__(self, *, name: str, T: int, seed: int, device: torch.device | str, dtype: torch.dtype,
                 eval_sequences: int = 2000, eval_batch_size: int = 100, eval_seed: int | None = None,
                 protocol: str = "hfrun"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"task.protocol must be one of {', '.join(PROTOCOLS)} (release: the tasks as "
                             f"Sutskever's released code defines them; hfrun: hfrun's earlier definitions), "
                             f"got {protocol!r}")
        self.T, self.protocol = T, protocol
        if protocol == "hfrun" and (not isinstance(T, int) or T < self.min_T):
            raise ValueError(f"{type(self).__name__} needs an integer T >= {self.min_T} under task.protocol="
                             f"hfrun (smaller T leaves a marked window empty), got T={T!r}")
        if protocol == "release" and (not isinstance(T, int) or T < 1 or not self.release_windows_fit()):
            raise ValueError(f"{type(self).__name__} under task.protocol=release has no valid layout at T={T!r}: "
                             "its positions scale as f(x) = ⌊x·T/100⌋, and this T leaves a window empty or puts "
                             f"a cue on a marked position. Every T >= {self.release_min_T} works.")
        if eval_sequences < MIN_HELD_OUT or eval_batch_size < 1:
            raise ValueError(f"task.eval_sequences must be at least {MIN_HELD_OUT} (the success criterion is an "
                             f"error below 0.001 on at least that many held-out sequences) and task.eval_batch_size "
                             f"positive, got {eval_sequences} and {eval_batch_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        self.name, self.T, self.seed, self.protocol = name, T, seed, protocol
        self.device, self.dtype = torch.device(device), dtype
        self.eval_sequences, self.eval_batch_size = eval_sequences, eval_batch_size
        self.eval_seed = seed if eval_seed is None else eval_seed
        self._eval_batches: list[Batch] | None = None

    def make_batch(self, batch_size: int, length: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def release_batch(self, batch_size: int, target_steps: Tensor, generator: torch.Generator,
                      first: int = 0) -> Batch:
        """A batch under the "release" definition; `target_steps` (B,) is each sequence's target step L;
        `first` numbers the batch's first sequence for the balanced labels (0 for a training draw)."""
        raise NotImplementedError

    def release_windows_fit(self) -> bool:
        """Whether this T gives every window of the "release" definition at least one position."""
        return len(self.lengths()) > 0

    def f(self, bound_at_100: int) -> int:
        """The release's f(x) = ⌊x·T/100⌋."""
        return last_position_upto(bound_at_100, self.T)

    def lengths(self) -> range:
        """"hfrun": the possible batch lengths, [T, T + T//10). "release": the possible target steps L."""
        if self.protocol == "release":
            if self.release_lengths_at_100 is None:
                return range(self.f(100) - 1, self.f(100))
            low, high = self.release_lengths_at_100
            return range(self.f(low), self.f(high))
        return range(self.T, self.T + self.T // 10)

    def release_steps(self) -> int:
        """The length of a "release" batch array: f(110) (f(55) for xor), or the fixed length f(100)."""
        return self.lengths().stop

    def sample_length(self, generator: torch.Generator) -> int:
        """One length for a whole batch, uniform on `lengths()` (the "hfrun" definition)."""
        lengths = self.lengths()
        return int(torch.randint(lengths.start, lengths.stop, (1,), generator=generator, device=self.device))

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        if self.protocol == "release":
            lengths = self.lengths()
            return self.release_batch(batch_size, self.randint(lengths.start, lengths.stop, (batch_size,), generator),
                                      generator)
        return self.make_batch(batch_size, self.sample_length(generator), generator)

    def train_stream(self) -> GeneratedStream:
        return GeneratedStream(self.sample_batch, make_generator(self.seed, self.device))

    def eval_batches(self) -> list[Batch]:
        if self._eval_batches is None:
            generator = make_generator(self.eval_seed + EVAL_SEED_OFFSET, self.device)
            full, rest = divmod(self.eval_sequences, self.eval_batch_size)
            sizes = [self.eval_batch_size] * full + ([rest] if rest else [])
            self._eval_batches = [self._eval_batch(i, sum(sizes[:i]), size, generator)
                                  for i, size in enumerate(sizes)]
        return self._eval_batches

    def _eval_batch(self, index: int, first_sequence: int, size: int, generator: torch.Generator) -> Batch:
        """Held-out batch `index`: "hfrun" gives it the index-th length; "release" gives its sequences the
        target steps in turn, continuing from the previous batch."""
        lengths = self.lengths()
        if self.protocol == "release":  # blocks of balance_period sequences (every label once) share a step
            number = torch.arange(first_sequence, first_sequence + size, device=self.device)
            turn = (number // self.balance_period) % len(lengths)
            return self.release_batch(size, lengths.start + turn, generator, first=first_sequence)
        return self.make_batch(size, lengths[index % len(lengths)], generator)

    def scored(self, batch: Batch) -> Tensor:
        """(B, steps) bool: the steps the 0-1 error checks."""
        steps = batch.inputs.shape[1]
        if self.protocol == "release":
            return batch.mask > 0
        last = torch.zeros(batch.size, steps, dtype=torch.bool, device=batch.inputs.device)
        last[:, steps - self.scored_steps:] = True
        return last

    def correct(self, outputs: Tensor, batch: Batch) -> Tensor:
        """(B,) bool: the sequence is right at every one of its scored steps."""
        expected = (*batch.inputs.shape[:2], self.output_size)
        if tuple(outputs.shape) != expected:
            raise ValueError(f"{self.name}: outputs have shape {tuple(outputs.shape)}, expected {expected} "
                             "(batch, steps, output units)")
        right = self.step_correct(outputs, batch.targets)
        return (right | ~self.scored(batch)).all(dim=1)

    def metric_sum(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The number of sequences that are not correct."""
        return (~self.correct(outputs, batch)).sum()

    def randint(self, low: int, high: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Integers uniform on [low, high) on the task's device."""
        return torch.randint(low, high, shape, generator=generator, device=self.device)

    def balanced(self, batch_size: int, classes: int, first: int = 0) -> Tensor:
        """(B,) the release's balanced labels: the b-th sequence of a batch gets b mod classes (numbered
        from `first`)."""
        return torch.arange(first, first + batch_size, device=self.device) % classes


class MarkedPairTask(PathologicalTask):
    """Two channels per step: a random value and a marker ∈ {0, 1}. Exactly two steps
    are marked: the first in [0, 10%) of L, the second in [10%, 50%). The target,
    scored at the last step only, is `combine(first value, second value)`.

    These are the bounds of Martens & Sutskever (2011); H&S put the first marker
    in the first 10 steps and the second before T/2, and Sutskever's code uses
    [1%, 10%) and [10%, 50%).

    "release": the marker channel is −1 at step 0 (as in H&S) and at step L − 3
    (a prediction comes), 1 at the two operands, at I ∈ [f(1), f(10)) and
    J ∈ [f(10), f(50)) (xor: [f(15), f(25))); the first operand may fall on
    step 0 at T < 100, where it replaces the start cue as in the release. Random
    values fill every step of the f(110)-step array; the target sits at step L.
    """

    input_size, output_size = 2, 1
    release_windows_at_100 = ((1, 10), (10, 50))  # the operands' positions [low, high), at T = 100
    PREDICTION_CUE = 3  # the marker is −1 this many steps before the target step

    def release_windows_fit(self) -> bool:
        """Both operand windows and the target steps non-empty, the cue after the second operand."""
        windows = [(self.f(low), self.f(high)) for low, high in self.release_windows_at_100]
        return (len(self.lengths()) > 0 and all(low < high for low, high in windows)
                and self.lengths().start - self.PREDICTION_CUE >= windows[1][1])

    def sample_values(self, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def combine(self, first: Tensor, second: Tensor) -> Tensor:
        raise NotImplementedError

    def make_batch(self, batch_size: int, length: int, generator: torch.Generator) -> Batch:
        values = self.sample_values(batch_size, length, generator)
        boundary = first_position_from(10, length)  # positions < L/10 are before it
        first = self.randint(0, boundary, (batch_size, 1), generator)
        second = self.randint(boundary, first_position_from(50, length), (batch_size, 1), generator)
        markers = torch.zeros_like(values).scatter_(1, first, 1.0).scatter_(1, second, 1.0)
        targets = torch.zeros(batch_size, length, 1, dtype=self.dtype, device=self.device)
        targets[:, -1, 0] = self.combine(values.gather(1, first), values.gather(1, second)).squeeze(1)
        return Batch(torch.stack([values, markers], dim=-1), targets,
                     last_step_mask(batch_size, length, self.dtype, self.device))

    def release_batch(self, batch_size: int, target_steps: Tensor, generator: torch.Generator,
                      first: int = 0) -> Batch:
        steps = self.release_steps()
        values = self.sample_values(batch_size, steps, generator)
        (first_low, first_high), (second_low, second_high) = self.release_windows_at_100
        first = self.randint(self.f(first_low), self.f(first_high), (batch_size, 1), generator)
        second = self.randint(self.f(second_low), self.f(second_high), (batch_size, 1), generator)
        target_at = target_steps.view(batch_size, 1)
        markers = torch.zeros_like(values)
        markers[:, 0] = -1.0
        markers.scatter_(1, first, 1.0).scatter_(1, second, 1.0).scatter_(1, target_at - self.PREDICTION_CUE, -1.0)
        answer = self.combine(values.gather(1, first), values.gather(1, second))
        targets = torch.zeros(batch_size, steps, dtype=self.dtype, device=self.device).scatter_(1, target_at, answer)
        mask = torch.zeros(batch_size, steps, dtype=self.dtype, device=self.device).scatter_(1, target_at, 1.0)
        return Batch(torch.stack([values, markers], dim=-1), targets.unsqueeze(-1), mask)


class Addition(MarkedPairTask):
    """Values U[0, 1] (H&S used U[−1, 1]); target: the sum of the two marked values.
    Squared error on a linear output; correct when |prediction − target| < 0.04."""

    loss = SquaredError()
    step_correct = staticmethod(within_tolerance)

    def sample_values(self, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
        return torch.rand(batch_size, length, generator=generator, device=self.device, dtype=self.dtype)

    def combine(self, first: Tensor, second: Tensor) -> Tensor:
        return first + second


class Multiplication(Addition):
    """Values U[0, 1]; target: the product of the two marked values. Criterion as addition."""

    def combine(self, first: Tensor, second: Tensor) -> Tensor:
        return first * second


class Xor(MarkedPairTask):
    """Values are random bits; target: the XOR of the two marked bits.
    Sigmoid cross-entropy; correct when the output thresholded at ½ equals the bit."""

    loss = SigmoidCrossEntropy()
    step_correct = staticmethod(threshold_correct)
    # "release": half the nominal length, L ∈ [f(50), f(55)), and the second operand in [f(15), f(25))
    release_lengths_at_100 = (50, 55)
    release_windows_at_100 = ((1, 10), (15, 25))
    release_min_T = 20  # [f(50), f(55)) is non-empty for every T >= 20 (and for some smaller T, e.g. 19)

    def sample_values(self, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
        return self.randint(0, 2, (batch_size, length), generator).to(self.dtype)

    def combine(self, first: Tensor, second: Tensor) -> Tensor:
        return (first != second).to(self.dtype)


class TemporalOrder(PathologicalTask):
    """One-hot over 8 symbols: distractors a, b, c, d; relevant X, Y; start E; end B.

    Step 0 is E and step L−1 is B. One relevant symbol, X or Y with equal
    probability, sits in each window; at L = 100 the windows are t1 ∈ [10, 20]
    and t2 ∈ [50, 60] (closed), scaled with L. Every other step is a uniform
    distractor. The class, scored at the last step with softmax cross-entropy,
    is the relevant sequence read as a binary number with X = 0, Y = 1 and the
    first symbol most significant: XX, XY, YX, YY → 0, 1, 2, 3. Correct when
    the argmax is the class.

    "release": step 0 is E; B announces the prediction at step L − 1 (at the
    target step L itself for 3 symbols, as in the release); X/Y sit at
    I ∈ [f(1), f(10)] and J ∈ [f(40), f(50)] (closed; 3 symbols: [f(1), f(10)],
    [f(30), f(40)], [f(50), f(60)]), the first of which may replace E at T < 100
    as in the release. The b-th sequence of a batch has class b mod classes, so
    the classes are balanced; distractors fill every other step of the
    f(110)-step array, and the class is the target at step L. (The release
    numbers the classes in another bit order, a relabelling of the output
    units that changes nothing.)
    """

    DISTRACTORS, X, START, END = 4, 4, 6, 7  # a..d = 0..3, X = 4, Y = 5, E = 6, B = 7
    windows_at_100: tuple[tuple[int, int], ...] = ((10, 20), (50, 60))
    release_windows_at_100: tuple[tuple[int, int], ...] = ((1, 10), (40, 50))
    release_cue_before_target = 1  # B this many steps before the target step

    @property
    def balance_period(self) -> int:
        return self.output_size

    def release_windows_fit(self) -> bool:
        """The closed windows in order without overlap, and B after the last of them."""
        windows = [(self.f(low), self.f(high)) for low, high in self.release_windows_at_100]
        ordered = all(earlier[1] < later[0] for earlier, later in zip(windows, windows[1:]))
        return (len(self.lengths()) > 0 and ordered
                and self.lengths().start - self.release_cue_before_target > windows[-1][1])
    input_size, output_size = 8, 2 ** len(windows_at_100)
    loss = SoftmaxCrossEntropy()
    step_correct = staticmethod(argmax_correct)

    def make_batch(self, batch_size: int, length: int, generator: torch.Generator) -> Batch:
        symbols = self.randint(0, self.DISTRACTORS, (batch_size, length), generator)
        symbols[:, 0], symbols[:, -1] = self.START, self.END
        classes = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        for low, high in self.windows_at_100:
            position = self.randint(first_position_from(low, length), last_position_upto(high, length) + 1,
                                    (batch_size, 1), generator)
            is_y = self.randint(0, 2, (batch_size,), generator)
            symbols.scatter_(1, position, (self.X + is_y).unsqueeze(1))
            classes = 2 * classes + is_y
        targets = torch.zeros(batch_size, length, dtype=torch.long, device=self.device)
        targets[:, -1] = classes
        return Batch(one_hot(symbols, self.input_size, self.dtype), targets,
                     last_step_mask(batch_size, length, self.dtype, self.device))

    def release_batch(self, batch_size: int, target_steps: Tensor, generator: torch.Generator,
                      first: int = 0) -> Batch:
        steps = self.release_steps()
        symbols = self.randint(0, self.DISTRACTORS, (batch_size, steps), generator)
        target_at = target_steps.view(batch_size, 1)
        symbols.scatter_(1, target_at - self.release_cue_before_target, self.END)
        symbols[:, 0] = self.START
        classes = self.balanced(batch_size, self.output_size, first)
        windows = self.release_windows_at_100
        for index, (low, high) in enumerate(windows):
            position = self.randint(self.f(low), self.f(high) + 1, (batch_size, 1), generator)
            is_y = (classes >> (len(windows) - 1 - index)) & 1  # the first symbol is the most significant bit
            symbols.scatter_(1, position, (self.X + is_y).unsqueeze(1))
        targets = torch.zeros(batch_size, steps, dtype=torch.long, device=self.device)
        targets.scatter_(1, target_at, classes.unsqueeze(1))
        mask = torch.zeros(batch_size, steps, dtype=self.dtype, device=self.device).scatter_(1, target_at, 1.0)
        return Batch(one_hot(symbols, self.input_size, self.dtype), targets, mask)


class TemporalOrder3(TemporalOrder):
    """Temporal order with three relevant symbols in t1 ∈ [10, 20], t2 ∈ [33, 43],
    t3 ∈ [66, 76] (at L = 100): 8 classes, XXX → 0 … YYY → 7."""

    windows_at_100 = ((10, 20), (33, 43), (66, 76))
    output_size = 2 ** len(windows_at_100)
    release_windows_at_100 = ((1, 10), (30, 40), (50, 60))
    release_cue_before_target = 0


class RandomPermutation(PathologicalTask):
    """One-hot over 100 symbols. A sequence of L + 1 symbols s_0 … s_L has s_0 ∈ {0, 1},
    s_1 … s_{L−1} uniform on the other 98 symbols, and s_L = s_0. The input at step
    t is s_t and the target is the next symbol s_{t+1}.

    As in Sutskever's code the loss (softmax cross-entropy) covers every step,
    although only the last target, which repeats the first symbol, is
    predictable; the middle steps contribute at least log 98 each. The 0-1 error
    scores only the last step (argmax = s_0).

    "release": a fixed length L = f(100) = T steps (T + 1 symbols), and the b-th
    sequence of a batch starts with b mod 2, so the two answers are balanced.
    """

    SYMBOLS = 100
    input_size = output_size = SYMBOLS
    loss = SoftmaxCrossEntropy()
    step_correct = staticmethod(argmax_correct)

    release_lengths_at_100 = None  # "release": a fixed length of f(100) steps, the first symbol b mod 2

    def scored(self, batch: Batch) -> Tensor:
        """The last step only, under both definitions (the mask covers every step)."""
        last = torch.zeros_like(batch.mask, dtype=torch.bool)
        last[:, -1] = True
        return last

    def make_batch(self, batch_size: int, length: int, generator: torch.Generator,
                   first: Tensor | None = None) -> Batch:
        if first is None:
            first = self.randint(0, 2, (batch_size, 1), generator)
        middle = self.randint(2, self.SYMBOLS, (batch_size, length - 1), generator)
        symbols = torch.cat([first, middle, first], dim=1)
        mask = torch.ones(batch_size, length, dtype=self.dtype, device=self.device)
        return Batch(one_hot(symbols[:, :-1], self.SYMBOLS, self.dtype), symbols[:, 1:], mask)

    def release_batch(self, batch_size: int, target_steps: Tensor, generator: torch.Generator,
                      first: int = 0) -> Batch:
        return self.make_batch(batch_size, self.release_steps(), generator,
                               first=self.balanced(batch_size, 2, first).unsqueeze(1))

    def release_windows_fit(self) -> bool:
        return self.f(100) >= 2


class NoiselessMemorization(PathologicalTask):
    """K symbols, each uniform on V values, are shown one per step at steps 0 … K−1;
    then come D ∈ [T, T + T//10) steps of a constant blank input, so L = K + D.
    The blank at step L−K−1, just before the answer window (M&S 2011: "a special
    input in the 5th timestep before the end"), is replaced by a "go" cue.

    Inputs are one-hot over V + 2 symbols (values, blank = V, go = V + 1).
    Targets are one of V + 1 classes (values, blank = V): blank at every step
    except the last K, which must reproduce the K symbols in order. The loss is
    softmax cross-entropy at every step (mask all ones); a sequence is correct
    when the argmax is right at every one of the last K steps.

    "release": a fixed total length of f(100) = T steps, so the last data step
    and the first answer step are T − K apart; the go cue at step T − K − 1 as
    above. The 0-1 error scores every step, blanks included, as the release's
    does. When a batch can hold every one of the V^K possible sequences, the
    b-th sequence shows b mod V^K (its base-V digits, most significant first):
    for 5 bits a batch of 32 holds each sequence once, and M&S count that batch
    as one minibatch (`published_minibatch`); otherwise the symbols are random.
    One departure, on purpose: the release one-hot codes the blank and the go
    cue on the channels of the last two symbol values (with 2 values, the blank
    reads as the bit 1), which makes them ambiguous; hfrun gives them channels
    of their own, as H&S and M&S describe the task.
    """

    release_lengths_at_100 = None  # "release": a fixed total length of f(100) steps

    memory_length = 5  # K
    symbol_values = 2  # V
    input_size, output_size = symbol_values + 2, symbol_values + 1
    loss = SoftmaxCrossEntropy()
    step_correct = staticmethod(argmax_correct)

    @property
    def scored_steps(self) -> int:
        return self.memory_length

    def lengths(self) -> range:
        """"hfrun": K data steps, then D ∈ [T, T + T//10) steps. "release": the fixed length f(100)."""
        base = super().lengths()
        if self.protocol == "release":
            return base
        return range(self.memory_length + base.start, self.memory_length + base.stop)

    @property
    def release_min_T(self) -> int:
        return 2 * self.memory_length + 1

    def release_windows_fit(self) -> bool:
        return self.T >= 2 * self.memory_length + 1  # the go cue after the data, the answer after the cue

    @property
    def published_minibatch(self) -> int:
        every_sequence = self.symbol_values ** self.memory_length
        return every_sequence if self.protocol == "release" and every_sequence < 1000 else 1000

    def release_batch(self, batch_size: int, target_steps: Tensor, generator: torch.Generator,
                      first: int = 0) -> Batch:
        every_sequence = self.symbol_values ** self.memory_length
        if batch_size < every_sequence:
            return self.make_batch(batch_size, self.release_steps(), generator)
        index = self.balanced(batch_size, every_sequence, first).unsqueeze(1)
        place = self.symbol_values ** torch.arange(self.memory_length - 1, -1, -1, device=self.device)
        return self.make_batch(batch_size, self.release_steps(), generator, data=index // place % self.symbol_values)

    def make_batch(self, batch_size: int, length: int, generator: torch.Generator,
                   data: Tensor | None = None) -> Batch:
        memory, blank = self.memory_length, self.symbol_values
        if data is None:
            data = self.randint(0, self.symbol_values, (batch_size, memory), generator)
        symbols = torch.full((batch_size, length), blank, dtype=torch.long, device=self.device)
        symbols[:, :memory] = data
        symbols[:, length - memory - 1] = blank + 1  # the go cue
        targets = torch.full((batch_size, length), blank, dtype=torch.long, device=self.device)
        targets[:, -memory:] = data
        mask = torch.ones(batch_size, length, dtype=self.dtype, device=self.device)
        return Batch(one_hot(symbols, self.input_size, self.dtype), targets, mask)


class Memorization5(NoiselessMemorization):
    """5 bits (K = 5, V = 2): 4 input symbols, 3 output classes."""


class Memorization20(NoiselessMemorization):
    """10 symbols from 5 values (K = 10, V = 5, about 23 bits): 7 input symbols, 6 output classes."""

    memory_length, symbol_values = 10, 5
    input_size, output_size = symbol_values + 2, symbol_values + 1
    min_T = memory_length + 1  # the go cue must fall after the data
