"""Error 2 of the rank-2 methods: dense eigvalsh(F̂) against the matrix-free path (issue #2).

Per size and method, in the same run and thread count: seconds of a dense eigvalsh of the
symmetrized F̂ (p × p), seconds of ``ExactReference(stats).error2(F̂)`` from scratch (F's
spectrum from the N × N Gram identity, F̂'s top N eigenvalues by KronSum.eigenvalues), their
ratio, and |E2_new − E2_dense| / E2_dense with E2_dense from dense eigvalsh of F and F̂.
``mnist1`` has no dense baseline (p = 785,000): the matrix-free time alone is reported.

Usage:
    python benchmarks/bench_eig.py --sizes curves,mnist --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from bench_core import RANK2, SIZES, synthetic_stats

from fisherlab.kron import ExactReference, fit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="curves,mnist")
    ap.add_argument("--methods", default=",".join(RANK2))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} float64", flush=True)
    print(f"{'size':<10} {'method':<15} {'dense s':>9} {'new s':>8} {'ratio':>7} {'|dE2|/E2':>9} {'E2':>8}  load")
    for name in args.sizes.split(","):
        size = SIZES[name]
        stats = synthetic_stats(size, torch.float64)
        lam_f = None
        if name != "mnist1":
            lam_f = torch.linalg.eigvalsh(stats.to_dense(max_entries=size.p**2)).flip(0)
        for method in args.methods.split(","):
            op = fit(method, stats).op
            t0 = time.perf_counter()
            e2 = ExactReference(stats).error2(op).value
            t_new = time.perf_counter() - t0
            if lam_f is None:
                print(f"{size.name:<10} {method:<15} {'—':>9} {t_new:>8.3g} {'—':>7} {'—':>9} {e2:>8.4g}  "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
                continue
            dense_hat = op.to_dense(max_entries=size.p**2)
            t0 = time.perf_counter()
            lam_hat = torch.linalg.eigvalsh((dense_hat + dense_hat.T) / 2).flip(0)
            t_dense = time.perf_counter() - t0
            d2 = float(torch.linalg.vector_norm(lam_f - lam_hat) / torch.linalg.vector_norm(lam_f))
            print(f"{size.name:<10} {method:<15} {t_dense:>9.3g} {t_new:>8.3g} {t_dense / t_new:>6.1f}x "
                  f"{abs(e2 - d2) / d2:>9.1e} {e2:>8.4g}  {os.getloadavg()[0]:.1f}", flush=True)
            del dense_hat
    return 0


if __name__ == "__main__":
    sys.exit(main())
