"""Dense versus matrix-free timings of the Kronecker core (fisherlab.kron).

Synthetic but realistic per-sample statistics at the paper's layer-5 sizes (and MNIST
layer 1), float64 by default. The baseline is the dense path measured in the same run:

    dense:       F = stats.to_dense(); eigvalsh(F); svd(Z(F)); F̂ dense + eigvalsh(F̂) per method
    matrix-free: stats.frobenius_norm() + stats.eigenvalues(); fit + error1 + error2 per method

Every row prints as soon as it is measured. Targets (PASS/FAIL at the end):

    (1) spectrum + norm of F at least 500x faster than dense;
    (2) Error 2 of each rank-2 method at least 10x faster than a dense eigvalsh(F̂);
    (3) fitting kfac, kpsvd, deflation, lanczos, kfac_corrected and kronecker_svd and computing their
        Error 1 at MNIST layer 1 (p = 785,000) takes less than one dense eigvalsh(F) at MNIST
        layer 5 (p = 7,750).

Usage:
    python benchmarks/bench_core.py                       # curves, mnist, faces (estimated), mnist1
    python benchmarks/bench_core.py --sizes curves --repeat 3
    python benchmarks/bench_core.py --sizes faces --faces-dense   # measure FACES dense (minutes, ~6 GB)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fisherlab.kron import METHODS, BlockStats, error1, error2, fit, kronecker_svd
from fisherlab.kron.layout import rearrange

METHODS5 = tuple(name for name, m in METHODS.items() if m.optimizer_options is not None)  # the paper's five
RANK2 = ("deflation", "lanczos", "kfac_corrected")


@dataclass(frozen=True)
class Size:
    name: str
    d_in: int
    d_out: int
    n: int

    @property
    def p(self) -> int:
        return self.d_out * (self.d_in + 1)


SIZES = {
    "curves": Size("CURVES L5", 50, 25, 256),  # p = 25 * 51 = 1,275
    "mnist": Size("MNIST L5", 30, 250, 512),  # p = 250 * 31 = 7,750
    "faces": Size("FACES L5", 30, 500, 1024),  # p = 500 * 31 = 15,500
    "mnist1": Size("MNIST L1", 784, 1000, 512),  # p = 1000 * 785 = 785,000
}


def synthetic_stats(size: Size, dtype: torch.dtype, seed: int = 0) -> BlockStats:
    """ReLU-like activations (some dead units) with a bias column of ones; small correlated g.

    ``a``: column 0 = 1, then ReLU of correlated pre-activations, ~10% of units always dead.
    ``g``: scale ~1e-3, correlated across units through a low-dimensional mixing, ~10% of
    output units with an all-zero column (saturated / unused outputs), heavy-ish row scales.
    """
    gen = torch.Generator().manual_seed(seed)
    n, d_in, d_out = size.n, size.d_in, size.d_out
    latent = max(8, d_in // 3)
    z = torch.randn(n, latent, generator=gen, dtype=torch.float64)
    mix = torch.randn(latent, d_in, generator=gen, dtype=torch.float64) / latent**0.5
    shift = 0.3 * torch.randn(d_in, generator=gen, dtype=torch.float64)
    h = torch.relu(z @ mix + shift + 0.3 * torch.randn(n, d_in, generator=gen, dtype=torch.float64))
    dead = torch.rand(d_in, generator=gen) < 0.1
    h[:, dead] = 0
    a = torch.cat([torch.ones(n, 1, dtype=torch.float64), h], dim=1)

    glat = max(4, d_out // 8)
    gz = torch.randn(n, glat, generator=gen, dtype=torch.float64)
    gmix = torch.randn(glat, d_out, generator=gen, dtype=torch.float64) / glat**0.5
    row_scale = torch.exp(0.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64))
    g = 1e-3 * row_scale * (gz @ gmix + 0.2 * torch.randn(n, d_out, generator=gen, dtype=torch.float64))
    g[:, torch.rand(d_out, generator=gen) < 0.1] = 0
    return BlockStats(a.to(dtype), g.to(dtype))


def timeit(fn: Callable[[], object], repeat: int, budget: float = 20.0) -> tuple[float, object]:
    """Best of up to ``repeat`` runs (fewer once ``budget`` seconds are spent); returns (s, result)."""
    best, out, spent = float("inf"), None, 0.0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best, out


def _error2(stats: BlockStats, approx, rtol: float = 0.0) -> float:
    # rtol > 0: certified truncated Error 2 (fisherlab.kron.metrics.error2's rtol), if available.
    return error2(stats, approx, rtol=rtol) if rtol else error2(stats, approx)


def _error2_child(a, g, act, grad, rtol, conn) -> None:
    from fisherlab.kron import KronSum

    stats, approx = BlockStats(a, g), KronSum(act, grad)
    t0 = time.perf_counter()
    out = _error2(stats, approx, rtol)
    conn.send((time.perf_counter() - t0, out))


def error2_with_timeout(stats: BlockStats, approx, timeout: float, rtol: float = 0.0) -> tuple[float, float | None, bool]:
    """``error2`` once in a spawned child (fork is unsafe after OpenMP has run); returns
    (seconds, value, finished). A child still running after ``timeout`` seconds of its own
    compute is terminated and ``timeout`` is reported as a lower bound."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_error2_child, args=(stats.a, stats.g, approx.act, approx.grad, rtol, send), daemon=True)
    proc.start()
    # Allow ~30 s for the child to start (imports) on a loaded machine.
    if recv.poll(timeout + 30):
        dt, out = recv.recv()
        proc.join()
        return dt, out, True
    proc.terminate()
    proc.join()
    return timeout, None, False


class Table:
    HEAD = f"{'size':<10} {'quantity':<34} {'dense s':>12} {'matrix-free s':>14} {'ratio':>10}"

    def __init__(self) -> None:
        print(self.HEAD)
        print("-" * len(self.HEAD), flush=True)

    @staticmethod
    def row(size: str, quantity: str, dense: float | None, free: float | None, est: bool = False, note: str = "",
            free_lb: bool = False) -> None:
        d = "—" if dense is None else f"{dense:.4g}{'*' if est else ''}"
        f = "—" if free is None else f"{'>' if free_lb else ''}{free:.4g}"
        r = "—" if dense is None or free is None or free == 0 else f"{'<' if free_lb else ''}{dense / free:.1f}x"
        print(f"{size:<10} {quantity:<34} {d:>12} {f:>14} {r:>10}{'  ' + note if note else ''}", flush=True)


def bench_layer5(size: Size, dtype, repeat: int, table: Table, dense_eig: bool, ref: dict,
                 e2_timeout: float | None = None, e2_rtol: float = 0.0) -> dict:
    """One layer-5 size. ``dense_eig=False`` estimates the dense eigvalsh rows by O(p³) from ``ref``."""
    stats = synthetic_stats(size, dtype)
    m, nn = stats.d_act, stats.d_grad
    tag = size.name.split()[0]
    res: dict = {"p": size.p}

    def est(key: str) -> float:
        if key not in ref:
            raise RuntimeError(f"no measured {key} to scale from: include a measured size first")
        p0, t0 = ref[key]
        return t0 * (size.p / p0) ** 3

    # -- F itself -----------------------------------------------------------------------
    t_form, dense_f = timeit(lambda: stats.to_dense(max_entries=size.p**2), repeat)
    Table.row(tag, "form F (to_dense)", t_form, None)

    def free_spec():
        fresh = BlockStats(stats.a, stats.g)  # no cached inner products
        return fresh.frobenius_norm(), fresh.eigenvalues()

    t_free_spec, _ = timeit(free_spec, max(repeat, 5))
    lam_f = None
    if dense_eig:
        t_dense_spec, (_, lam_f) = timeit(
            lambda: (torch.linalg.matrix_norm(dense_f), torch.linalg.eigvalsh(dense_f)), repeat)
        ref.setdefault("eig", (size.p, t_dense_spec))
    else:
        t_dense_spec = est("eig")
    res["spec"] = (t_dense_spec, t_free_spec, not dense_eig)
    Table.row(tag, "spectrum+norm of F", t_dense_spec, t_free_spec, est=not dense_eig)
    Table.row(tag, "  (dense incl. forming F)", t_dense_spec + t_form, t_free_spec, est=not dense_eig)

    t_dsvd, _ = timeit(lambda: torch.linalg.svd(rearrange(dense_f, m, nn), full_matrices=False), repeat)
    t_fsvd, _ = timeit(lambda: kronecker_svd(BlockStats(stats.a, stats.g), rank=2), repeat)
    Table.row(tag, "Kronecker SVD: svd Z(F) | span", t_dsvd, t_fsvd)

    # -- the five methods -----------------------------------------------------------------
    tot_dense = t_form + t_dense_spec + t_dsvd
    tot_free = t_free_spec
    res["e2"] = {}
    for method in METHODS5:
        t_fit, fr = timeit(lambda: fit(method, stats), repeat)
        it = fr.info.iterations
        Table.row(tag, f"fit {method}", None, t_fit, note=f"iters={it} conv={fr.info.converged}")
        approx = fr.op
        t_hat, dense_hat = timeit(lambda: approx.to_dense(max_entries=size.p**2), repeat)

        norm_f = torch.linalg.matrix_norm(dense_f)
        t_de1, de1 = timeit(lambda: float(torch.linalg.matrix_norm(dense_f - dense_hat) / norm_f), repeat)
        t_fe1, fe1 = timeit(lambda: error1(stats, approx), max(repeat, 3))
        Table.row(tag, f"E1 {method}", t_hat + t_de1, t_fe1, note=f"E1={fe1:.4g} (dense {de1:.4g})")

        if dense_eig:
            t_deig, lam_hat = timeit(lambda: torch.linalg.eigvalsh((dense_hat + dense_hat.T) / 2), repeat)
            ref.setdefault("eig_hat", (size.p, t_deig))
        else:
            t_deig, lam_hat = est("eig_hat"), None
        if approx.rank > 1 and approx.p > 2048 and e2_timeout:
            t_fe2, fe2, done = error2_with_timeout(stats, approx, e2_timeout, e2_rtol)
        else:
            (t_fe2, fe2), done = timeit(lambda: _error2(stats, approx, e2_rtol), repeat), True
        note = f"E2={fe2:.4g}" if done else f"E2 stopped after {e2_timeout:g} s"
        if lam_hat is not None:
            de2 = float(torch.linalg.vector_norm(lam_f - lam_hat) / torch.linalg.vector_norm(lam_f))
            note += f" (dense {de2:.4g}, |ΔE2|/E2 {abs(fe2 - de2) / max(de2, 1e-300):.1e})" if done else f" (dense {de2:.4g})"
        Table.row(tag, f"E2 {method} vs eigvalsh(F̂)", t_deig, t_fe2, est=not dense_eig, note=note, free_lb=not done)
        res["e2"][method] = (t_deig, t_fe2, not dense_eig, not done)
        tot_dense += t_hat + t_de1 + t_deig
        tot_free += t_fit + t_fe1 + t_fe2
        dense_hat = None  # free the p × p block before the next method
    Table.row(tag, "TOTAL (dense path vs free path)", tot_dense, tot_free, est=not dense_eig)
    print(flush=True)
    return res


def bench_mnist1(dtype, repeat: int, table: Table, ref_eig: float | None) -> dict:
    size = SIZES["mnist1"]
    stats = synthetic_stats(size, dtype)
    tag = "MNIST1"
    total = 0.0
    for method in METHODS:
        t_fit, fr = timeit(lambda: fit(method, stats), repeat)
        t_e1, e1 = timeit(lambda: error1(stats, fr.op), repeat)
        Table.row(tag, f"fit+E1 {method}", None, t_fit + t_e1,
                  note=f"fit {t_fit:.3g}s iters={fr.info.iterations} E1={e1:.4g}")
        total += t_fit + t_e1
    Table.row(tag, "all six fit+E1 vs MNIST-L5 eigvalsh", ref_eig, total)
    print(flush=True)
    return {"total": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="curves,mnist,faces,mnist1", help="comma list of curves,mnist,faces,mnist1")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs (cheap rows repeat more)")
    ap.add_argument("--faces-dense", action="store_true",
                    help="measure the FACES dense eigvalsh rows (minutes, ~2 GB a matrix) instead of O(p³) estimates")
    ap.add_argument("--e2-timeout", type=float, default=600.0,
                    help="stop a matrix-free Error 2 (ARPACK path) after this many seconds and report a bound "
                         "(0: no limit)")
    ap.add_argument("--e2-rtol", type=float, default=0.0,
                    help="relative accuracy asked of the matrix-free Error 2 (0: exact, all N eigenvalues)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"unknown sizes {bad}; choose from {', '.join(SIZES)}")
    # Estimates scale from the largest measured size, so measure in increasing p.
    sizes.sort(key=lambda s: SIZES[s].p if s != "mnist1" else float("inf"))

    print(f"fisherlab.kron benchmark: dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} repeat={args.repeat} e2_rtol={args.e2_rtol:g} "
          f"loadavg={os.getloadavg()[0]:.1f} (timings of small calls are unreliable when this exceeds the cores)")
    for s in sizes:
        z = SIZES[s]
        print(f"  {z.name}: d_in={z.d_in} -> d_out={z.d_out}, p={z.p:,}, N={z.n}")
    print("  ratio = dense / matrix-free;  * = estimated from the largest measured size by O(p^3)\n", flush=True)

    table = Table()
    ref: dict = {}
    results: dict = {}
    for s in sizes:
        if s == "mnist1":
            continue
        measure = s != "faces" or args.faces_dense or "eig" not in ref
        if s == "faces" and "eig" not in ref and not args.faces_dense:
            print("  (no smaller size measured: FACES dense eigvalsh is measured, not estimated)", flush=True)
        # Later, larger measured sizes give better estimates: overwrite the reference.
        if measure and s != "faces":
            ref.pop("eig", None)
            ref.pop("eig_hat", None)
        results[s] = bench_layer5(SIZES[s], dtype, args.repeat, table, measure, ref, args.e2_timeout, args.e2_rtol)

    ref_eig = None
    if "mnist1" in sizes:
        if "mnist" in results and not results["mnist"]["spec"][2]:
            ref_eig = results["mnist"]["spec"][0]
        else:
            st = synthetic_stats(SIZES["mnist"], dtype)
            f = st.to_dense()
            ref_eig, _ = timeit(lambda: torch.linalg.eigvalsh(f), 1)
            print(f"  (measured the MNIST L5 dense eigvalsh reference: {ref_eig:.4g} s)", flush=True)
            del f
        results["mnist1"] = bench_mnist1(dtype, args.repeat, table, ref_eig)

    print(f"Targets (loadavg now {os.getloadavg()[0]:.1f})")
    ok_all = True
    for s, r in results.items():
        if s == "mnist1":
            continue
        d, f, e = r["spec"]
        ok = d / f >= 500
        ok_all &= ok
        print(f"  (1) {SIZES[s].name:<10} spectrum+norm {d / f:>10.1f}x (>= 500x){' [dense estimated]' if e else ''}: "
              f"{'PASS' if ok else 'FAIL'}")
    for s, r in results.items():
        if s == "mnist1":
            continue
        for method in RANK2:
            d, f, e, lb = r["e2"][method]
            ok = d / f >= 10
            ok_all &= ok
            print(f"  (2) {SIZES[s].name:<10} E2 {method:<15} {'<' if lb else ' '}{d / f:>8.2f}x (>= 10x)"
                  f"{' [dense estimated]' if e else ''}{' [matrix-free stopped at timeout]' if lb else ''}: "
                  f"{'PASS' if ok else 'FAIL'}")
    if "mnist1" in results:
        tot = results["mnist1"]["total"]
        ok = tot < ref_eig
        ok_all &= ok
        print(f"  (3) MNIST L1 six fits + E1 {tot:.4g} s vs MNIST L5 dense eigvalsh(F) {ref_eig:.4g} s: "
              f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
