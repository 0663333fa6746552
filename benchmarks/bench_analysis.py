"""Seconds to analyze one recorded MNIST step: dense path against matrix-free path (issue #4).

One step of the MNIST auto-encoder (784-1000-500-250-30-250-500-1000-784, N = 512) is
recorded once (``fisherlab.record.record``, all eight layers, no dense blocks) into
``--workdir`` and reused by later runs. Then, in float64, for the five methods of the paper
(kfac, kpsvd, deflation, lanczos, kfac_corrected; ranks and tolerance as ``fisherlab
analyze``):

    dense (layer 5 only, p = 7,750):
        F = stats.to_dense(); eigvalsh(F);
        per method: fit + F̂ = approx.to_dense() + dense_error1 + eigvalsh(F̂) (Error 2)
    matrix-free (layer 5 alone, and all eight layers):
        ExactReference(stats) (‖F‖ and the top N eigenvalues of F);
        per method: fit + ref.error1 + ref.error2(rtol)   for rtol = 0 (exact, the
        analysis default) and rtol = 1e-2, reported as separate rows

Error 2 of a multi-term sum above the dense-eigenvalue limit runs in a spawned child and is
stopped after ``--error2-timeout-s`` seconds of its own compute ('timeout': the matrix-free
total is then a lower bound, printed with '>'). If the rtol = 1e-2 run of a (layer, method)
times out, the exact one is not attempted (it needs at least the same work) and is
reported as a timeout too. Rows print as they are measured.

Target (PASS/FAIL at the end): all eight layers matrix-free in less time than the dense
path takes for layer 5 alone.

``--compare`` (issue #14) times ``fisherlab analyze`` end to end instead, every method,
``--layers`` (default all eight), each contender on its own copy of the recorded file in a
fresh child process (timed inside it, imports excluded):

    base exact           the serial analysis, exact Error 2 (rtol 0), of ``--baseline-tree``
                         (an export of the fisherlab to compare with, e.g. the last merge)
    base rtol=R          the same, certified to ``--certified-rtol`` R (default 1e-2)
    exact                this tree's serial analysis, exact Error 2
    workers=W exact      this tree with ``--workers`` W (Dask, one thread each)
    rtol=R, workers=W rtol=R   the certified mode, serial and with W workers

(``--runs`` picks some; base only with ``--baseline-tree``), then the dense path of layer 5
(unless ``--no-dense``). It prints per layer and method the Error 2 seconds of the serial runs
(``error_seconds`` of errors.csv), each run's wall time and ratio to the baseline (``base
exact``, else ``exact``), whether the workers' results equal the serial ones bit for bit and
how far this tree's Error 2 is from the baseline's. Target: ``workers=W exact`` in at most
half of ``base exact``.

Run with OMP_NUM_THREADS=1 on a shared machine (oversubscribed threads make timings noisy).
``--device cuda`` (the default where a GPU is present) runs both paths on the GPU, in float64;
timings then synchronize the device.

To measure a fixed commit while the working tree is being edited, export it and put it first
on the path: ``git archive HEAD fisherlab | tar -x -C /tmp/head; PYTHONPATH=/tmp/head python …``
(the spawned Error 2 children inherit PYTHONPATH).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_analysis.py --workdir /tmp/fisherlab-bench
    python benchmarks/bench_analysis.py --layers 5 --error2-timeout-s 60
    python benchmarks/bench_analysis.py --layers all --device cuda
    git archive <commit> fisherlab | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/bench_analysis.py --compare --baseline-tree /tmp/base --workers 2
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fisherlab.kron import METHODS, BlockStats, ExactReference, KronSum, dense_error1, fit

METHODS5 = tuple(name for name, m in METHODS.items() if m.optimizer_options is not None)  # the paper's five
MNIST = "784-1000-500-250-30-250-500-1000-784"
RTOLS = (0.0, 1e-2)


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def recorded_step(workdir: Path) -> tuple[Path, str]:
    """The cached one-step MNIST run file (recorded on first use); returns (path, data note)."""
    from fisherlab.errors import DataNotFoundError
    from fisherlab.record import record
    from fisherlab.store import RunReader

    workdir.mkdir(parents=True, exist_ok=True)
    for problem, name in (("mnist", "mnist_1step.h5"), (MNIST, "synthetic_1step.h5")):
        path = workdir / name
        if path.is_file():
            try:
                with RunReader(path) as reader:
                    if reader.steps():
                        return path, problem
            except Exception:  # a damaged cache: record again
                pass
        t0 = time.perf_counter()
        try:
            record(problem, path, steps=1, every=1, layers="all", dense_budget=0, progress=False, force=True)
        except DataNotFoundError as exc:
            print(f"  MNIST data not found ({exc}); falling back to problem {MNIST!r} on synthetic data", flush=True)
            continue
        print(f"  recorded {problem} step into {path} in {time.perf_counter() - t0:.1f} s", flush=True)
        return path, problem
    raise RuntimeError("could not record a step")


def clock() -> float:
    """``time.perf_counter()`` after the GPU's queued work has finished (if CUDA is in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def fit_default(method: str, stats: BlockStats):
    options = dict(METHODS[method].analysis_options)
    return fit(method, stats, **options)


# -- Error 2 with a time cap ------------------------------------------------------------------
def _error2_child(a, g, act, grad, rtol, device, conn) -> None:
    # Tensors cross the process boundary on the CPU and go back to the device here.
    a, g, act, grad = (x.to(device) for x in (a, g, act, grad))
    ref = ExactReference(BlockStats(a, g))
    _ = ref.eigenvalues  # counted in the parent's ExactReference row, not here
    approx = KronSum(act, grad)
    t0 = clock()
    out = ref.error2(approx, rtol=rtol)
    conn.send((clock() - t0, out.value, out.halfwidth))


def error2_capped(ref: ExactReference, approx: KronSum, rtol: float, timeout: float):
    """(seconds, value, halfwidth, finished). Cheap cases run in-process; multi-term sums above
    the dense limit in a spawned child (fork is unsafe after OpenMP has run), stopped after
    ``timeout`` seconds of compute (then seconds = timeout, a lower bound)."""
    if approx.eigen_solver(ref.eigenvalues.shape[0]) in ("closed form", "dense") or not timeout:
        t0 = clock()
        out = ref.error2(approx, rtol=rtol)
        return clock() - t0, out.value, out.halfwidth, True
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    stats = ref.stats
    cpu = [x.cpu() for x in (stats.a, stats.g, approx.act, approx.grad)]
    proc = ctx.Process(target=_error2_child, args=(*cpu, rtol, str(stats.device), send), daemon=True)
    proc.start()
    send.close()
    # ~30 s of slack for the child's imports and its N x N eigenproblem on a loaded machine.
    if recv.poll(timeout + 30):
        try:
            dt, value, half = recv.recv()
        except EOFError:  # the child died (an exception, or out of memory): see its traceback
            proc.join()
            return None, None, None, False
        proc.join()
        if dt <= timeout:
            return dt, value, half, True
        return timeout, None, None, False
    proc.terminate()
    proc.join()
    return timeout, None, None, False


# -- printing -----------------------------------------------------------------------------------
def fmt_s(t: float | None, lower: bool = False) -> str:
    return "—" if t is None else f"{'>' if lower else ''}{t:.4g}"


def row(layer: str, what: str, seconds: float | None, note: str = "", lower: bool = False) -> None:
    print(f"  L{layer:<3} {what:<38} {fmt_s(seconds, lower):>10} s  {note}", flush=True)


# -- dense path, layer 5 ------------------------------------------------------------------------
def dense_layer(stats: BlockStats, methods) -> dict:
    res: dict = {"methods": {}}
    t0 = clock()
    f = stats.to_dense(max_entries=stats.p**2)
    res["form"] = clock() - t0
    row("5", "dense: form F (to_dense)", res["form"], f"p={stats.p:,}")
    t0 = clock()
    lam_f = torch.linalg.eigvalsh(f).flip(0)
    res["eig"] = clock() - t0
    row("5", "dense: eigvalsh(F)", res["eig"])
    norm_lam = torch.linalg.vector_norm(lam_f)
    for method in methods:
        t0 = clock()
        approx = fit_default(method, stats).op
        t_fit = clock() - t0
        t0 = clock()
        f_hat = approx.to_dense(max_entries=stats.p**2)
        t_form = clock() - t0
        t0 = clock()
        e1 = dense_error1(f, f_hat)
        t_e1 = clock() - t0
        t0 = clock()
        lam_hat = torch.linalg.eigvalsh((f_hat + f_hat.T) / 2).flip(0)
        e2 = float(torch.linalg.vector_norm(lam_f - lam_hat) / norm_lam)
        t_e2 = clock() - t0
        del f_hat
        total = t_fit + t_form + t_e1 + t_e2
        res["methods"][method] = {"total": total, "e1": e1, "e2": e2}
        row("5", f"dense: {method}", total,
            f"fit {t_fit:.3g} + form F̂ {t_form:.3g} + E1 {t_e1:.3g} + E2 {t_e2:.3g};  E1={e1:.6g} E2={e2:.6g}")
    res["total"] = res["form"] + res["eig"] + sum(m["total"] for m in res["methods"].values())
    row("5", "dense: TOTAL", res["total"], f"(loadavg {load_avg()})")
    return res


# -- matrix-free path -----------------------------------------------------------------------------
def free_layer(layer: int, stats: BlockStats, methods, timeout: float) -> dict:
    tag = str(layer)
    res: dict = {"methods": {}}
    t0 = clock()
    ref = ExactReference(stats)
    _ = ref.eigenvalues
    res["ref"] = clock() - t0
    row(tag, "free: ExactReference (‖F‖, top-N eig)", res["ref"], f"p={stats.p:,} N={stats.n_samples}")
    for method in methods:
        t0 = clock()
        approx = fit_default(method, stats)
        t_fit = clock() - t0
        info = approx.info
        approx = approx.op
        t0 = clock()
        e1 = ref.error1(approx)
        t_e1 = clock() - t0
        m = {"fit": t_fit, "e1": t_e1, "e1_value": e1, "e2": {}}
        row(tag, f"free: {method} fit + E1", t_fit + t_e1,
            f"fit {t_fit:.3g} (iters={info.iterations} conv={info.converged}) + E1 {t_e1:.3g};  E1={e1:.6g}")
        # rtol 1e-2 first: if it times out, the exact one (at least as much work) is not attempted.
        for rtol in sorted(RTOLS, reverse=True):
            prev = m["e2"].get(max(RTOLS))
            if prev is not None and not prev["done"] and not prev.get("error"):
                m["e2"][rtol] = {"t": timeout, "done": False, "skipped": True}
                row(tag, f"free: {method} E2 rtol={rtol:g}", timeout, "timeout (implied by rtol=1e-2 timing out)",
                    lower=True)
                continue
            t, value, half, done = error2_capped(ref, approx, rtol, timeout)
            failed = t is None
            if failed:  # counted as the cap, like a timeout, but reported as an error
                t = timeout
            m["e2"][rtol] = {"t": t, "done": done, "value": value, "half": half, "error": failed}
            note = (f"E2={value:.6g} ± {half:.3g} (halfwidth/E2={half / value if value else 0:.2g})" if done
                    else "ERROR in the child (traceback above)" if failed else f"timeout after {timeout:g} s")
            row(tag, f"free: {method} E2 rtol={rtol:g}", t, note, lower=not done)
        res["methods"][method] = m
    for rtol in RTOLS:
        tot = res["ref"] + sum(m["fit"] + m["e1"] + m["e2"][rtol]["t"] for m in res["methods"].values())
        lower = any(not m["e2"][rtol]["done"] for m in res["methods"].values())
        res[("total", rtol)] = (tot, lower)
        row(tag, f"free: TOTAL rtol={rtol:g}", tot, f"(loadavg {load_avg()})", lower=lower)
    return res


# -- end-to-end analysis: serial against workers, exact against certified, against a baseline tree ----
def analyze_child(args) -> int:
    """``--child``: analyze one copy of the run file, print the seconds on a ``RESULT`` line."""
    from fisherlab.analysis import analyze

    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    methods = None if args.methods is None else args.methods.split(",")
    t0 = time.perf_counter()
    analyze(args.child, out_dir=Path(args.child).parent / Path(args.child).stem, methods=methods, layers=layers,
            error2_rtol=args.rtol, workers=args.workers or None, progress=False, device=args.device)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    return 0


def compare_runs(args, run: Path) -> dict:
    """Each contender of ``--compare`` on a fresh copy of ``run`` in a child process."""
    this_tree = Path(__file__).resolve().parent.parent
    rtol = args.certified_rtol
    contenders = {  # name: (tree, rtol, workers)
        "base exact": (args.baseline_tree, 0.0, 0),
        f"base rtol={rtol:g}": (args.baseline_tree, rtol, 0),
        "exact": (str(this_tree), 0.0, 0),
        f"workers={args.workers} exact": (str(this_tree), 0.0, args.workers),
        f"rtol={rtol:g}": (str(this_tree), rtol, 0),
        f"workers={args.workers} rtol={rtol:g}": (str(this_tree), rtol, args.workers),
    }
    wanted = None if args.runs is None else [x.strip() for x in args.runs.split(",")]
    out_dir = Path(args.workdir) / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (tree, rtol_i, workers) in contenders.items():
        key = name.replace("=", "").replace(" ", "_").replace(".", "")
        if tree is None or (wanted is not None and key not in wanted and name not in wanted):
            continue
        copy = out_dir / f"{key}.h5"
        shutil.copyfile(run, copy)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(copy), "--layers", args.layers,
               "--rtol", repr(rtol_i), "--workers", str(workers), "--device", args.device]
        if args.methods_given:
            cmd += ["--methods", args.methods]
        env = dict(os.environ, PYTHONPATH=tree)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"  {name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        seconds = json.loads(line[len("RESULT "):])["seconds"]
        with open(out_dir / key / "errors.csv", newline="") as fh:
            rows = {(int(r["layer"]), r["method"]): r for r in csv.DictReader(fh)}
        results[name] = {"seconds": seconds, "rows": rows, "rtol": rtol_i, "workers": workers, "tree": tree}
        print(f"  {name:<24} {seconds:10.1f} s  (fisherlab from {tree}; loadavg {load_avg()})", flush=True)
    return results


def compare_report(args, results: dict, dense: dict | None) -> int:
    if not results:
        return 1
    base_name = "base exact" if "base exact" in results else "exact" if "exact" in results else next(iter(results))
    base = results[base_name]["seconds"]
    print(f"\nEnd-to-end analysis (ratio = {base_name} / run; loadavg {load_avg()})")
    head = f"{'run':<26} {'wall s':>10} {'ratio':>8} {'Σ fit+E s':>11}"
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        recorded = sum(float(x["seconds"] or 0) + float(x["error_seconds"] or 0) for x in r["rows"].values())
        print(f"{name:<26} {r['seconds']:10.1f} {base / r['seconds']:7.2f}x {recorded:11.1f}")
    serial = [name for name, r in results.items() if not r["workers"]]
    keys = sorted(next(iter(results.values()))["rows"])
    print("\nError 2 seconds per layer and method (serial runs; error_seconds of errors.csv, Error 1 included)")
    head = f"{'layer':<6} {'method':<16}" + "".join(f" {n:>16}" for n in serial)
    print(head + "\n" + "-" * len(head))
    for layer in sorted({k[0] for k in keys}):
        for method in [k[1] for k in keys if k[0] == layer]:
            cells = []
            for n in serial:
                row = results[n]["rows"].get((layer, method))
                cells.append(f" {float(row['error_seconds']):16.3f}" if row and row["error_seconds"] else f" {'—':>16}")
            print(f"L{layer:<5} {method:<16}" + "".join(cells))
        sums = [sum(float(r["error_seconds"] or 0) + float(r["seconds"] or 0)
                    for (i, _), r in results[n]["rows"].items() if i == layer) for n in serial]
        print(f"L{layer:<5} {'(fit+E, all)':<16}" + "".join(f" {x:16.3f}" for x in sums))
    print("\nChecks")
    for name, r in results.items():
        if not r["workers"]:
            continue
        twin = next((n for n, x in results.items() if not x["workers"] and x["rtol"] == r["rtol"] and x["tree"] == r["tree"]),
                    None)
        if twin is None:
            continue
        cols = ("error1", "error2", "error2_halfwidth")
        same = all(results[twin]["rows"][k][c] == r["rows"][k][c] for k in results[twin]["rows"] for c in cols)
        print(f"  {name} equals {twin} bit for bit (error1, error2, halfwidth): {'yes' if same else 'NO'}")
    for name, r in results.items():
        if name == base_name or r["workers"]:
            continue
        ref = results[base_name]["rows"]
        worst, outside = 0.0, 0
        for k, row in r["rows"].items():
            if k in ref and row["error2"] and ref[k]["error2"]:
                e, e0 = float(row["error2"]), float(ref[k]["error2"])
                worst = max(worst, abs(e - e0) / abs(e0) if e0 else abs(e))
                outside += abs(e - e0) > float(row["error2_halfwidth"] or 0) + float(ref[k]["error2_halfwidth"] or 0) + 1e-15
        print(f"  {name} against {base_name}: Error 2 max relative difference {worst:.2g}, "
              f"{outside} rows outside the sum of their half-widths")
    if dense is not None and "exact" in results:
        worst = max(abs(float(results["exact"]["rows"][(5, m)]["error2"]) - d["e2"]) / d["e2"]
                    for m, d in dense["methods"].items() if (5, m) in results["exact"]["rows"])
        print(f"  exact against the dense layer-5 path: Error 2 max relative difference {worst:.2g}")
        print(f"  dense layer-5 path (form F, eigvalsh, every method): {dense['total']:.1f} s")
    target = f"workers={args.workers} exact"
    if target in results and "base exact" in results:
        ratio = results[target]["seconds"] / results["base exact"]["seconds"]
        verdict = "PASS" if ratio <= 0.5 else "FAIL"
        print(f"\nTarget: {target} ≤ 0.5 × base exact: {results[target]['seconds']:.1f} s / "
              f"{results['base exact']['seconds']:.1f} s = {ratio:.2f}: {verdict}")
        return 0 if verdict == "PASS" else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fisherlab-bench-analysis"),
                    help="where the recorded one-step run file is cached")
    ap.add_argument("--layers", default="all",
                    help="'all' or a comma list of 1-based layers (5 is always included, but with --compare)")
    ap.add_argument("--methods", default=",".join(METHODS5), help="comma list of methods")
    ap.add_argument("--error2-timeout-s", type=float, default=300.0,
                    help="cap on one matrix-free Error 2 of a multi-term sum (0: no cap, in-process)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense layer-5 path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where both paths run (default: cuda if available)")
    ap.add_argument("--compare", action="store_true",
                    help="time `fisherlab analyze` end to end: serial, --workers, certified, baseline tree")
    ap.add_argument("--baseline-tree", help="--compare: a directory holding the fisherlab package to compare with")
    ap.add_argument("--workers", type=int, default=2, help="--compare: Dask workers")
    ap.add_argument("--certified-rtol", type=float, default=1e-2, help="--compare: rtol of the certified runs")
    ap.add_argument("--runs", help="--compare: comma list of contenders (e.g. base_exact,exact,workers2_exact)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rtol", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods_given = any(a == "--methods" or a.startswith("--methods=") for a in (argv or sys.argv[1:]))
    if args.child:
        if not args.methods_given:
            args.methods = None
        return analyze_child(args)
    if args.compare and args.baseline_tree and not (Path(args.baseline_tree) / "fisherlab").is_dir():
        ap.error(f"--baseline-tree {args.baseline_tree}: no fisherlab package there")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    import fisherlab
    from fisherlab.store import RunReader

    print(f"fisherlab analysis benchmark: fisherlab from {Path(fisherlab.__file__).parent} dtype=float64 "
          f"threads={torch.get_num_threads()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} torch={torch.__version__} "
          f"cores={os.cpu_count()} device={args.device} loadavg={load_avg()} error2_timeout={args.error2_timeout_s:g}s",
          flush=True)
    run, problem = recorded_step(Path(args.workdir))
    with RunReader(run) as reader:
        step = reader.steps()[0]
        all_layers = list(reader.layers)
        chosen = {int(x) for x in args.layers.split(",")} if args.layers != "all" else set(all_layers)
        layers = sorted(chosen if args.compare else chosen | {5})
        stats = {i: reader.stats(step, i, torch.float64).to(device=args.device) for i in layers}
    print(f"  run {run} (problem {problem}), step {step}; layers:", flush=True)
    for i in layers:
        s = stats[i]
        print(f"    L{i}: d_in+1={s.d_act}, d_out={s.d_grad}, p={s.p:,}, N={s.n_samples}", flush=True)
    print(flush=True)

    if args.compare:
        results = compare_runs(args, run)
        dense = None if args.no_dense or 5 not in stats else dense_layer(stats[5], methods)
        return compare_report(args, results, dense)
    dense = None
    if not args.no_dense:
        dense = dense_layer(stats[5], methods)
        print(flush=True)
    free: dict[int, dict] = {}
    # Layer 5 first (the 'layer 5 alone' rows), then the others from small p to large.
    for i in [5] + sorted((j for j in layers if j != 5), key=lambda j: stats[j].p):
        free[i] = free_layer(i, stats[i], methods, args.error2_timeout_s)
        print(flush=True)

    # -- final table ---------------------------------------------------------------------------
    head = f"{'quantity':<46} {'dense s':>10} {'matrix-free s':>14} {'ratio':>10}"
    print(f"Summary (loadavg {load_avg()}; ratio = dense / matrix-free; '>' = lower bound, an Error 2 timed out)")
    print(head)
    print("-" * len(head))

    def line(what: str, d: float | None, f: float | None, lower: bool = False) -> None:
        r = "—" if d is None or not f else f"{'<' if lower else ''}{d / f:.2f}x"
        print(f"{what:<46} {fmt_s(d):>10} {fmt_s(f, lower):>14} {r:>10}", flush=True)

    l5 = free[5]
    line("L5 spectrum+norm of F (form+eigvalsh | ref)", dense and dense["form"] + dense["eig"], l5["ref"])
    for rtol in RTOLS:
        for method in methods:
            m = l5["methods"][method]
            e2 = m["e2"][rtol]
            line(f"L5 {method} fit+E1+E2 (rtol={rtol:g})", dense and dense["methods"][method]["total"],
                 m["fit"] + m["e1"] + e2["t"], not e2["done"])
    for rtol in RTOLS:
        t, lb = l5[("total", rtol)]
        line(f"L5 alone, all methods (rtol={rtol:g})", dense and dense["total"], t, lb)
    totals = {}
    for rtol in RTOLS:
        t = sum(free[i][("total", rtol)][0] for i in free)
        lb = any(free[i][("total", rtol)][1] for i in free)
        totals[rtol] = (t, lb)
        line(f"all {len(free)} layers vs dense L5 (rtol={rtol:g})", dense and dense["total"], t, lb)
    print()
    if dense is not None:
        print("Accuracy check, layer 5 (dense | matrix-free exact):")
        for method in methods:
            d, m = dense["methods"][method], l5["methods"][method]
            e2 = m["e2"][min(RTOLS)]
            e2s = f"{e2['value']:.6g} ± {e2['half']:.2g}" if e2["done"] else "timeout"
            print(f"  {method:<15} E1 {d['e1']:.6g} | {m['e1_value']:.6g}   E2 {d['e2']:.6g} | {e2s}")
        print()
    print(f"Target: all {len(free)} layers matrix-free < dense path for layer 5 alone (loadavg {load_avg()})")
    ok_all = True
    for rtol in RTOLS:
        t, lb = totals[rtol]
        if dense is None:
            print(f"  rtol={rtol:g}: matrix-free {fmt_s(t, lb)} s; no dense run")
            continue
        ok = t < dense["total"]
        verdict = "PASS" if ok and not lb else ("FAIL" if not ok else "UNKNOWN (timeouts below the dense time)")
        ok_all &= verdict == "PASS"
        print(f"  rtol={rtol:g}: matrix-free {fmt_s(t, lb)} s vs dense {dense['total']:.4g} s: {verdict}")
    if len(free) < 8:
        print(f"  (only layers {sorted(free)} were run)")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
