"""How many curvatures ``1 + s₁s₂`` of the §3.4 two-term solve are ≤ 0 and in (0, floor).

On one problem, after some Adam steps, each layer's two-term approximation (Deflation,
Lanczos, KFAC-corrected, the optimizer's fit options) is fitted to one mini-batch block and
π-damped; the table counts per layer the curvatures ≤ 0, those in (0, 0.1), and what the
remedies ``clip`` (every pair) and ``clip_indefinite`` (indefinite pairs only) change.

Usage::

    python benchmarks/bench_remedy.py --problem curves --steps 30 --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fisherlab.capture import BlockCapture
from fisherlab.data import load_dataset
from fisherlab.io import atomic_write
from fisherlab.kron import fit
from fisherlab.kron.methods import METHODS
from fisherlab.kron.solve import damped_inverse
from fisherlab.problems import get_problem

FLOOR = 0.1
# Below this a curvature counts as ≤ 0 (``floor`` must be positive).
ZERO = 1e-300


def study(name: str, steps: int, dampings: tuple[float, ...], methods: tuple[str, ...]) -> list[dict]:
    problem = get_problem(name)
    data = load_dataset(problem.dataset).train
    torch.manual_seed(0)
    model = problem.build_model(seed=0, dtype=torch.float64)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = problem.batch_size
    for k in range(steps):
        x = data[k * b : (k + 1) * b].double()
        adam.zero_grad()
        problem.loss(model(x), x).backward()
        adam.step()
    x = data[steps * b : (steps + 1) * b].double()
    with BlockCapture(model) as capture:
        out = model(x)
        stats = capture.capture(out, problem.likelihood, generator=torch.Generator().manual_seed(0))
    rows = []
    for method in methods:
        for layer, block in stats.items():
            op = fit(method, block, **METHODS[method].optimizer_options).op
            for damping in dampings:
                raw = damped_inverse(op, damping, indefinite="clip", floor=ZERO)
                low = int((raw.denom < FLOOR).sum()) if raw.denom is not None else 0
                nonpositive = raw.clipped
                rows.append({
                    "method": method, "layer": layer, "damping": damping, "curvatures": op.p,
                    "nonpositive": nonpositive, "small_positive": low - nonpositive,
                    "clip": damped_inverse(op, damping, indefinite="clip", floor=FLOOR).clipped,
                    "clip_indefinite": damped_inverse(op, damping, floor=FLOOR).clipped,
                })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | layer | λ | curvatures | ≤ 0 | in (0, 0.1) | changed by clip | changed by clip_indefinite |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['layer']} | {r['damping']:g} | {r['curvatures']} | {r['nonpositive']} | "
                     f"{r['small_positive']} | {r['clip']} | {r['clip_indefinite']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="curves")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--methods", nargs="+", default=["deflation", "lanczos", "kfac_corrected"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = table(study(args.problem, args.steps, tuple(args.dampings), tuple(args.methods)))
    header = (f"# Curvatures of the §3.4 solve: {args.problem}, after {args.steps} Adam steps (lr 1e-3, batch "
              f"{get_problem(args.problem).batch_size}), one MC block, float64\n\n"
              f"`python benchmarks/bench_remedy.py --problem {args.problem} --steps {args.steps}`\n\n")
    print(text)
    if args.out is not None:
        atomic_write(args.out / "remedy_scope.md", header + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
