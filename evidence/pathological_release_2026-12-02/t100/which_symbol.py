"""What a temporal-order network has learned: for each of the two relevant symbols (the first at
I ∈ [f(1), f(10)], the second at J ∈ [f(40), f(50)]), how often the class the network picks has that
symbol right, on the run's held-out set (or a fresh one through --set, as hfrun.evaluate takes it).

The class is the pair read as two bits, the first symbol the more significant. Chance is 0.5 per bit and
0.75 error overall; a network that knows one symbol and guesses the other errs on 0.5 of the sequences.

Usage: python evidence/pathological_release_2026-12-02/t100/which_symbol.py RUN_DIR [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hfrun.errors import HfrunError
from hfrun.evaluate import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        state, task, model = load_run(args.run_dir, args.checkpoint, tuple(args.overrides), device="cpu")
    except HfrunError as error:
        raise SystemExit(f"error: {error}") from None
    bits = task.output_size.bit_length() - 1
    confusion = torch.zeros(task.output_size, task.output_size, dtype=torch.long)
    with torch.no_grad():
        for batch in task.eval_batches():
            outputs = model(batch.inputs)
            scored = task.scored(batch)  # one target step per sequence
            truth = batch.targets[scored]
            picked = outputs[scored].argmax(dim=-1)
            confusion += torch.bincount(truth * task.output_size + picked,
                                        minlength=task.output_size ** 2).view_as(confusion)
    total = int(confusion.sum())
    true_class = torch.arange(task.output_size).view(-1, 1).expand_as(confusion)
    picked_class = torch.arange(task.output_size).view(1, -1).expand_as(confusion)
    print(f"{args.run_dir}  checkpoint {args.checkpoint}.pt, update {state['progress']['update']}, "
          f"{total} held-out sequences")
    print(f"error {1 - int(confusion.trace()) / total:.4f}")
    for index in range(bits):
        shift = bits - 1 - index
        right = int(confusion[((true_class >> shift) & 1) == ((picked_class >> shift) & 1)].sum())
        print(f"symbol {index + 1} right: {right / total:.4f}")
    print("confusion (rows: true class, columns: picked; class = symbols as bits, X = 0, Y = 1):")
    for row in confusion.tolist():
        print("  " + " ".join(f"{count:5d}" for count in row))


if __name__ == "__main__":
    main()
