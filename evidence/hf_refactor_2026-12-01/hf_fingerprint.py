"""Fingerprint HF: parameters (sha256 of their bytes) and solver stats after a few updates, on fixed seeds."""
import hashlib, json, sys
import torch
sys.path.insert(0, "/work/main/tests")
from conftest import compose_config
from hfrun.engine import build_model, build_solver, build_task

CASES = {
    "linreg_mlp": ["solver=hf", "model=mlp", "model.hidden_sizes=[8]", "solver.gradient_batch_size=500", "solver.cg_max_iters=30"],
    "linreg_precond_undamped": ["solver=hf", "model=mlp", "model.hidden_sizes=[8]", "solver.gradient_batch_size=500",
                                "solver.preconditioner=martens", "solver.rho_model=undamped", "solver.weight_cost=1e-3",
                                "solver.warm_start=step", "solver.backtrack_batch_size=300"],
    "addition_T30": ["solver=hf", "task=addition_T30", "solver.gradient_batch_size=600", "solver.curvature_batch_size=300",
                     "solver.chunk_size=200", "solver.cg_max_iters=20"],
    "sine_hessian": ["solver=hf", "task=sine_f10", "task.points=2000", "solver.curvature=hessian", "solver.cg_max_iters=20"],
}
torch.set_num_threads(1)
out = {}
for name, overrides in CASES.items():
    cfg = compose_config(*overrides)
    torch.manual_seed(0)
    task = build_task(cfg, torch.device("cpu"), torch.float32)
    model = build_model(cfg, task, torch.device("cpu"), torch.float32)
    solver = build_solver(cfg, model, task)
    stream = task.train_stream()
    stats = [solver.step(stream) for _ in range(6)]
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    keep = ["loss", "lambda", "rho", "cg_iters", "cg_chosen_iter", "step_size", "examples_grad", "examples_curv"]
    out[name] = {"params": digest, "stats": [{k: s.get(k) for k in keep} for s in stats]}
    print(name, digest[:16], [s["cg_iters"] for s in stats])
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
