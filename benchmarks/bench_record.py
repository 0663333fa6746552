"""Seconds per training step of ``fisherlab record`` against plain Adam, for each compression.

Modes, each timed on the same model and batches, one step of each in turn so that a busy
machine slows them alike. The median step of each mode is reported in wall-clock time and
in CPU time of the process; other processes disturb the latter far less, so the targets are
checked against it. One torch thread by default: on a busy machine a second one spends most
of its time waiting for the first, which inflates and scatters every timing.

    plain Adam     the baseline: the step of ``fisherlab train``, Adam.step(closure), the
                   closure running zero_grad, forward, loss, backward
    unrecorded     Recorder.train_step(capture=False): a step of record that is not recorded
    capture        Recorder.train_step(capture=True): + the probe's extra backward pass
    write <c>      capture, then RunWriter.write_step(dense_budget=0) into a file compressed
                   with ``c`` and, at most every CHECKPOINT_INTERVAL_S, the resume
                   checkpoint: a whole recorded step of ``record --dense-budget 0``

Every compression asked for (default: all of fisherlab.store.COMPRESSIONS) gets its own
"write" mode in the same round robin, so its "x Adam" ratio is against the plain Adam steps
of the same run. The compression table adds, per compression, the median CPU seconds of
write_step alone, the median seconds to read back every layer's statistics of a recorded
step (RunReader.stats), and the stored MB per step. The dense blocks that the default
budget admits (``--dense-budget 1GiB``) are timed on one recorded step per compression
apart, since they cost seconds. Targets: a recorded step at most 2.5x plain Adam;
unrecorded steps at most 1.05x.

record writes synchronously, inside the step, so the CPU time of the process is the whole
cost of a step (benchmarks/results/run_file_compression.md says why there is no writer
thread).

Usage:
    python benchmarks/bench_record.py                      # curves and mnist, 20 steps a mode
    python benchmarks/bench_record.py --problems curves --steps 20 --compressions lz4 lzf gzip
    python benchmarks/bench_record.py --problems mnist --steps 40 --threads 2 --no-dense
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fisherlab.data import load_dataset
from fisherlab.errors import UserInputError
from fisherlab.loop import Checkpoint
from fisherlab.problems import get_problem
from fisherlab.record import CHECKPOINT_INTERVAL_S, Recorder
from fisherlab.store import (
    COMPRESSION_NEEDS_PLUGIN,
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_DENSE_BUDGET,
    RunReader,
    RunWriter,
)
from fisherlab.training import build_optimizer

TARGETS = {"write": 2.5, "unrecorded": 1.05}
DENSE_ROUNDS = 3


def _data(name: str, batch: int, count: int) -> tuple[list[torch.Tensor], str]:
    """``count`` batches of real data, or of uniform random pixels when the data set is missing."""
    gen = torch.Generator().manual_seed(0)
    try:
        train = load_dataset(name).train
        source = "real data"
    except UserInputError as exc:
        train = torch.rand(batch * count, get_problem(name).layer_sizes[0], generator=gen)
        source = f"RANDOM inputs ({exc})"
    order = torch.randperm(train.shape[0], generator=gen)[: batch * count]
    return [train[order[i * batch : (i + 1) * batch]].contiguous() for i in range(count)], source


def bench(name: str, steps: int, dense: bool, workdir: Path, compressions: list[str]) -> None:
    """Time the modes on one problem and print its two tables."""
    problem = get_problem(name)
    batches, source = _data(name, problem.batch_size, 8)
    model = problem.build_model(seed=0)
    adam = build_optimizer("adam", model, problem, lr=1e-3)
    layers = list(range(1, problem.num_layers + 1))
    # every=1 captures at every step, every=2 at none of the odd steps the unrecorded mode takes.
    capturing, idle = Recorder(model, problem, layers, every=1), Recorder(model, problem, layers, every=2)
    shapes = capturing.probe.layer_shapes
    files = {c: workdir / f"{name}-{c}.h5" for c in compressions}
    writers = {c: RunWriter(files[c], {"problem": name}, shapes, force=True, compression=c) for c in compressions}
    ckpt = Checkpoint(workdir / f"{name}.resume.pt", {"problem": name})
    counter = iter(range(10**8))
    recorded = {c: [] for c in compressions}  # steps written, for the read timing
    recorded_bytes = {c: [] for c in compressions}
    write_cpu = {c: [] for c in compressions}  # CPU seconds of write_step alone
    checkpoint_cpu = []
    last_checkpoint = {c: time.monotonic() for c in compressions}

    def plain(x: torch.Tensor) -> None:
        # The step of fisherlab.training.train (``fisherlab train --optimizer adam``).
        def closure() -> torch.Tensor:
            adam.zero_grad(set_to_none=True)
            loss = problem.loss(model(x), x)
            loss.backward()
            return loss

        float(adam.step(closure).detach())

    def loop_step(hook: Recorder, x: torch.Tensor, step: int) -> tuple[float, dict | None]:
        # The step of fisherlab.loop.Loop with record's hook.
        def closure() -> torch.Tensor:
            adam.zero_grad(set_to_none=True)
            loss = problem.loss(hook.forward(model, x, step), x)
            loss.backward()
            return loss

        return float(adam.step(closure).detach()), hook.stats

    def write(compression: str, x: torch.Tensor) -> None:
        step = next(counter)
        out, writer = files[compression], writers[compression]
        size = out.stat().st_size
        loss, stats = loop_step(capturing, x, 0)
        start = time.process_time()
        writer.write_step(step, 0, loss, stats, dense_budget=0)
        middle = time.process_time()
        write_cpu[compression].append(middle - start)
        if time.monotonic() - last_checkpoint[compression] >= CHECKPOINT_INTERVAL_S:  # record's policy
            ckpt.save({"model": model.state_dict(), "optimizer": adam.state_dict(), "step": step + 1})
            checkpoint_cpu.append(time.process_time() - middle)
            last_checkpoint[compression] = time.monotonic()
        recorded[compression].append(step)
        recorded_bytes[compression].append(out.stat().st_size - size)

    run = {
        "plain Adam": plain,
        "unrecorded": lambda x: loop_step(idle, x, 1),
        "capture": lambda x: loop_step(capturing, x, 0),
    }
    for c in compressions:
        run[f"write {c}"] = lambda x, c=c: write(c, x)
    modes = list(run)
    wall = {mode: [] for mode in modes}
    cpu = {mode: [] for mode in modes}
    for mode in modes:  # warm-up: allocator, Adam state, HDF5 files
        run[mode](batches[0])
    # Round robin, one step of each mode in turn, so that other load hits every mode alike; the
    # order rotates because the step after a file write runs on colder caches.
    for i in range(steps):
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            x = batches[i % len(batches)]
            start, start_cpu = time.perf_counter(), time.process_time()
            run[mode](x)
            wall[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
    for writer in writers.values():
        writer.close()

    print(
        f"\n{name}: batch {problem.batch_size}, {problem.num_parameters:,} parameters, {len(layers)} layers "
        f"recorded, {source}, {torch.get_num_threads()} threads, {steps} steps a mode, load {_load()}"
    )
    print(f"{'mode':<16}{'wall s':>9}{'x Adam':>9}{'CPU s':>9}{'x Adam':>9}  target (CPU)")
    med = {mode: (statistics.median(wall[mode]), statistics.median(cpu[mode])) for mode in modes}
    base = med["plain Adam"]
    for mode in modes:
        (w, c), target = med[mode], TARGETS.get("write" if mode.startswith("write") else mode)
        verdict = "" if target is None else f"{target:.2f}: " + ("met" if c / base[1] <= target else "MISSED")
        print(f"{mode:<16}{w:>9.3f}{w / base[0]:>9.2f}{c:>9.3f}{c / base[1]:>9.2f}  {verdict}")
    if checkpoint_cpu:
        print(f"resume checkpoints inside the write steps: {len(checkpoint_cpu)}, median "
              f"{statistics.median(checkpoint_cpu):.3f} s CPU")

    raw = sum(4 * problem.batch_size * (shapes[i][0] + 1 + shapes[i][1]) for i in layers) / 1e6
    print(f"\nstatistics of a recorded step ({raw:.2f} MB raw float32); x Adam: the whole recorded step, CPU")
    print(f"{'compression':<13}{'MB/step':>9}{'x raw':>7}{'write s':>9}{'read s':>9}{'x Adam':>8}  plugin-free")
    for c in compressions:
        mb = statistics.median(recorded_bytes[c][1:] or recorded_bytes[c]) / 1e6
        read = statistics.median(_read_seconds(files[c], recorded[c]))
        ratio = med[f"write {c}"][1] / base[1]
        plugin = "no (hdf5plugin)" if COMPRESSION_NEEDS_PLUGIN[c] else "yes"
        print(f"{c:<13}{mb:>9.2f}{mb / raw:>7.2f}{statistics.median(write_cpu[c]):>9.3f}{read:>9.3f}{ratio:>8.2f}  {plugin}")

    if dense:
        loss, stats = loop_step(capturing, batches[0], 0)
        admitted = [i for i, s in stats.items() if 4 * s.p**2 <= DEFAULT_DENSE_BUDGET]
        dense_raw = sum(4 * stats[i].p ** 2 for i in admitted) / 1e6
        print(f"\none recorded step with the dense blocks of the default budget (layers {admitted}, "
              f"{dense_raw:.0f} MB raw), forming them included")
        print(f"{'compression':<13}{'wall s':>9}{'CPU s':>9}{'MB':>9}   (median of {DENSE_ROUNDS} rounds)")
        timings = {c: [] for c in compressions}
        for _ in range(DENSE_ROUNDS):  # round robin again: the first write also pays for cold memory
            for c in compressions:
                out = workdir / f"{name}-{c}-dense.h5"
                with RunWriter(out, {"problem": name}, shapes, force=True, compression=c) as writer:
                    size = out.stat().st_size
                    start, start_cpu = time.perf_counter(), time.process_time()
                    writer.write_step(0, 0, loss, stats, dense_budget=DEFAULT_DENSE_BUDGET)
                    seconds, seconds_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                timings[c].append((seconds, seconds_cpu, (out.stat().st_size - size) / 1e6))
                out.unlink()
        for c, rows in timings.items():
            seconds, seconds_cpu, mb = (statistics.median(column) for column in zip(*rows))
            print(f"{c:<13}{seconds:>9.2f}{seconds_cpu:>9.2f}{mb:>9.1f}")


def _read_seconds(path: Path, steps: list[int]) -> list[float]:
    """Wall seconds to read every layer's statistics of each recorded step."""
    seconds = []
    with RunReader(path) as reader:
        for step in steps:
            start = time.perf_counter()
            for layer in reader.layers:
                reader.stats(step, layer, dtype=torch.float32)
            seconds.append(time.perf_counter() - start)
    return seconds


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["curves", "mnist"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine a second one mostly spins)",
    )
    parser.add_argument("--no-dense", action="store_true", help="skip the one-step dense write")
    parser.add_argument(
        "--compressions",
        nargs="+",
        default=list(COMPRESSIONS),
        choices=list(COMPRESSIONS),
        help=f"run-file compressions to time (default: all; record's default is {DEFAULT_COMPRESSION})",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.problems:
            bench(name, args.steps, not args.no_dense, Path(tmp), list(dict.fromkeys(args.compressions)))


if __name__ == "__main__":
    main()
