"""Seconds per step of KFAC and Deflation on a LeNet-5 classifier, against Adam, on one thread.

As ``bench_optim.py time`` does for the MLPs: a step that refreshes the statistics, the fits
and the inverses (``t_update``: forward, backward, the extra backward pass of the Fisher
type, every layer's block, fit and damped inverse) and a step that only applies the cached
inverses (``t_plain``) are timed separately, each the median of ``--repeats`` steps, on
MNIST-shaped random inputs and labels (the cost does not depend on the values), so that a
run with T₁ = T₂ = T costs ``((T − 1) t_plain + t_update) / T`` per step.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_optim_cnn.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fisherlab.io import atomic_write
from fisherlab.optim import NaturalGradient


def lenet5() -> nn.Module:
    """LeNet-5 on 28 × 28 inputs: conv 5×5 (padded) → pool → conv 5×5 → pool → 400-120-84-10."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def _seconds(opt, model, x, y, targets: bool) -> float:
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    start = time.perf_counter()
    if targets:
        opt.step(closure, targets=y)
    else:
        opt.step(closure)
    return time.perf_counter() - start


def run(batch: int, repeats: int, fisher: str, kfac_form: str) -> list[dict]:
    """Rows ``{optimizer, t_update, t_plain, ratios to Adam}``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    y = torch.randint(10, (batch,), generator=gen)
    torch.manual_seed(0)
    model = lenet5()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    _seconds(adam, model, x, y, False)  # warm-up
    t_adam = statistics.median(_seconds(adam, model, x, y, False) for _ in range(repeats))
    rows = [{"optimizer": "adam", "t_update": t_adam, "t_plain": t_adam}]
    for method in ("kfac", "deflation"):
        torch.manual_seed(0)
        model = lenet5()
        every = NaturalGradient(model, "categorical", method=method, lr=1e-3, damping=1e-2, t_stats=1, t_inv=1,
                                fisher=fisher, kfac_form=kfac_form)
        _seconds(every, model, x, y, fisher == "empirical")
        t_update = statistics.median(_seconds(every, model, x, y, fisher == "empirical") for _ in range(repeats))
        cached = NaturalGradient(model, "categorical", method=method, lr=1e-3, damping=1e-2,
                                 t_stats=10**6, t_inv=10**6, fisher=fisher, kfac_form=kfac_form)
        _seconds(cached, model, x, y, fisher == "empirical")  # the first step computes the inverses
        t_plain = statistics.median(_seconds(cached, model, x, y, False) for _ in range(repeats))
        rows.append({"optimizer": method, "t_update": t_update, "t_plain": t_plain})
    for row in rows:
        row["update_over_adam"] = row["t_update"] / t_adam
        row["plain_over_adam"] = row["t_plain"] / t_adam
        row["T100_over_adam"] = (99 * row["t_plain"] + row["t_update"]) / 100 / t_adam
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| optimizer | t_update (s) | t_plain (s) | update / Adam | plain / Adam | T₁=T₂=100 / Adam |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['t_update']:.4f} | {r['t_plain']:.4f} | {r['update_over_adam']:.2f} | "
                     f"{r['plain_over_adam']:.2f} | {r['T100_over_adam']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fisher", default="mc", choices=("mc", "empirical", "exact"))
    parser.add_argument("--kfac-form", default="expand", choices=("expand", "reduce"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.batch, args.repeats, args.fisher, args.kfac_form)
    text = (f"LeNet-5, batch {args.batch}, fisher {args.fisher}, KFAC {args.kfac_form}, one thread, "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, median of {args.repeats}\n\n"
            + table(rows) + "\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"optim_cnn_{args.fisher}_{args.kfac_form}"
        atomic_write(args.out / f"{stem}.md", text)
        atomic_write(args.out / f"{stem}.json", json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
