"""Seconds of ``fisherlab analyze`` in one process against ``--workers 2`` (issue #14).

A synthetic run file (random ReLU-like activations, Gaussian gradients, float64, no dense
blocks) of ``--layers`` layers and ``--steps`` recorded steps is written into ``--workdir``
and copied once per contender, so every contender starts from an unanalyzed file. Then, in
the same run, each copy is analyzed with every default method, exact Error 2 and warm starts:

    serial, 1 thread        analyze(run) with torch.set_num_threads(1)
    serial, N threads       analyze(run) with torch's default thread count (N = the cores)
    workers=W               analyze(run, workers=W): a local Dask cluster of W one-thread
                            processes, its start-up and shut-down included

The table gives each wall time, its ratio to the serial ones, and the concurrency achieved
(the fit and error seconds the results record, summed, over the wall time: about 1 for a
serial run, up to W for W workers when W cores are free) and the CPU seconds of all its
processes (client and workers): equal CPU seconds mean the workers add no work, and a wall
time above CPU / W then comes from other load on the machine; the last line checks that
the distributed results equal the one-thread serial ones bit for bit (timings aside).
Target (issue #14): workers=2 in at most 0.6 of the serial time on two cores. The machine
load is printed: on a shared machine the other processes take cores from the workers.

Usage:
    python benchmarks/bench_workers.py --workdir /tmp/fisherlab-bench-workers
    python benchmarks/bench_workers.py --layers 30x100,60x60 --steps 1 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from fisherlab.analysis import analyze, local_cluster
from fisherlab.kron import BlockStats
from fisherlab.store import RunReader, RunWriter

TIMINGS = ("seconds", "error_seconds")


def synthetic_run(path: Path, layers: list[tuple[int, int]], steps: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {i + 1: dims for i, dims in enumerate(layers)}
    with RunWriter(path, {"problem": "synthetic", "batch_size": n, "seed": seed}, shapes, force=True) as writer:
        for step in range(steps):
            stats = {}
            for i, (d_in, d_out) in shapes.items():
                a = torch.relu(torch.randn(n, d_in + 1, generator=gen, dtype=torch.float64))
                a[:, 0] = 1
                stats[i] = BlockStats(a, 1e-3 * torch.randn(n, d_out, generator=gen, dtype=torch.float64))
            writer.write_step(10 * step, 0, 1.0, stats, dense_budget=0)


def contents(path: Path) -> dict:
    with RunReader(path) as reader:
        out = {}
        for key in reader.analysis_keys():
            arrays, attrs = reader.read_analysis(*key)
            out[key] = ({k: v.tobytes() for k, v in arrays.items()}, {k: v for k, v in attrs.items() if k not in TIMINGS})
        return out


def busy_seconds(path: Path) -> float:
    """The fit and error seconds the results record: the compute, wherever it ran."""
    with RunReader(path) as reader:
        return sum(
            sum(reader.analysis_attrs(*key).get(k) or 0.0 for k in TIMINGS) for key in reader.analysis_keys()
        )


def _cpu_seconds() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def timed(label: str, run: Path, workers: int | None = None) -> tuple[float, float, float]:
    """Wall seconds of the analysis of ``run``, its concurrency (recorded compute / wall) and
    the CPU seconds of every process involved.

    With ``workers``, the local cluster is the one ``analyze(workers=...)`` starts, started
    here (by the same function) so that its processes' CPU time can be read; its start-up and
    shut-down are counted in the wall time.
    """
    start, cpu = time.perf_counter(), time.process_time()
    if workers is None:
        analyze(run, out_dir=run.parent / run.stem, progress=False)
        cpu = time.process_time() - cpu
    else:
        import dask.distributed

        cluster = local_cluster(workers)
        with cluster, dask.distributed.Client(cluster) as client:
            before = sum(client.run(_cpu_seconds).values())
            analyze(run, out_dir=run.parent / run.stem, progress=False, scheduler=cluster.scheduler_address)
            cpu = time.process_time() - cpu + sum(client.run(_cpu_seconds).values()) - before
    seconds = time.perf_counter() - start
    concurrency = busy_seconds(run) / seconds
    print(f"  {label:<22} {seconds:8.1f} s  concurrency {concurrency:4.2f}  CPU {cpu:6.1f} s  (loadavg {load_avg()})",
          flush=True)
    return seconds, concurrency, cpu


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/fisherlab-bench-workers")
    parser.add_argument(
        "--layers", default="30x100,60x60,100x40,40x80,50x50,80x30,20x120,70x40", help="d_in x d_out of each layer"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--samples", type=int, default=192, help="N, samples per recorded step")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    layers = [tuple(int(x) for x in spec.split("x")) for spec in args.layers.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "source.h5"
    synthetic_run(source, layers, args.steps, args.samples, seed=0)
    copies = {name: workdir / f"{name}.h5" for name in ("serial1", "serialN", "workers")}
    for copy in copies.values():
        shutil.copy(source, copy)
    default_threads = torch.get_num_threads()
    print(
        f"fisherlab workers benchmark: torch={torch.__version__} cores={os.cpu_count()} "
        f"default torch threads={default_threads} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}\n"
        f"  synthetic run: layers {args.layers} (d_in x d_out), {args.steps} steps, N={args.samples}, float64; "
        f"every default method, exact Error 2, warm starts"
    )
    torch.set_num_threads(1)
    serial1, c1, cpu1 = timed("serial, 1 thread", copies["serial1"])
    torch.set_num_threads(default_threads)
    serial_n, cn, cpun = timed(f"serial, {default_threads} threads", copies["serialN"])
    torch.set_num_threads(1)
    parallel, cw, cpuw = timed(f"workers={args.workers}", copies["workers"], workers=args.workers)
    header = f"{'/ serial ' + str(default_threads) + ' threads':>18}"
    print(f"\n  {'contender':<22} {'seconds':>8}  {'/ serial 1 thread':>18}  {header}  concurrency  CPU s")
    for label, seconds, busy, cpu in (
        ("serial, 1 thread", serial1, c1, cpu1), (f"serial, {default_threads} threads", serial_n, cn, cpun),
        (f"workers={args.workers}", parallel, cw, cpuw),
    ):
        print(f"  {label:<22} {seconds:8.1f}  {seconds / serial1:18.2f}  {seconds / serial_n:18.2f}  {busy:11.2f}  {cpu:5.1f}")
    same = contents(copies["workers"]) == contents(copies["serial1"])
    print(f"\n  workers={args.workers} results equal serial (1 thread) bit for bit: {same}")
    best_serial = min(serial1, serial_n)
    verdict = "PASS" if parallel <= 0.6 * best_serial else "FAIL"
    print(f"  target workers={args.workers} <= 0.6 x the faster serial: {parallel / best_serial:.2f} -> {verdict}")


if __name__ == "__main__":
    main()
