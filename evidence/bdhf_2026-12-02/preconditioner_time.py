"""What Martens' preconditioner costs in a BDHF update on the MNIST autoencoder (real MNIST, the task's hints:
per-case gradient squares on the 1000-case curvature batch), one thread, in one backward pass through the
nn.Linear layers against vmap's per-case gradients (the path before 2026-12-02), two updates each:
    HFRUN_DATASETS=<dir with mnist/> python evidence/bdhf_2026-12-02/preconditioner_time.py"""
import time

import torch
from hydra import compose, initialize_config_dir

import hfrun.curvature as curvature
import hfrun.solvers.hf as hf
from hfrun.allocator import keep_freed_memory
from hfrun.config import CONFIG_DIR
from hfrun.engine import build_model, build_solver, build_task


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(1)
    one_pass = curvature._linear_gradient_squares
    for label, fast in (("one backward pass", one_pass), ("vmap per case", lambda *args: None)):
        curvature._linear_gradient_squares = fast
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose("config", overrides=["solver=bdhf", "task=mnist_autoencoder", "seed=1"])
        torch.manual_seed(1)
        task = build_task(cfg, torch.device("cpu"), torch.float32)
        model = build_model(cfg, task, torch.device("cpu"), torch.float32)
        solver, stream = build_solver(cfg, model, task), task.train_stream()
        seconds = []
        squares = hf.per_case_gradient_squares

        def timed(*args):
            start = time.perf_counter()
            result = squares(*args)
            seconds.append(time.perf_counter() - start)
            return result

        hf.per_case_gradient_squares = timed
        for update in range(2):
            start = time.perf_counter()
            solver.step(stream)
            print(f"{label}: update {update} {time.perf_counter() - start:.1f} s, of which the squared per-case "
                  f"gradients {seconds[-1]:.2f} s")
        hf.per_case_gradient_squares = squares


if __name__ == "__main__":
    main()
