"""Seconds per training step of ``fisherlab record`` against plain Adam, on CURVES and MNIST.

Modes, each timed on the same model and batches, one step of each in turn so that a busy
machine slows them alike. The median step of each mode is reported in wall-clock time and
in CPU time of the process; other processes disturb the latter far less, so the targets are
checked against it. One torch thread by default: on a busy machine a second one spends most
of its time waiting for the first, which inflates and scatters every timing.

    plain Adam     the step of ``fisherlab train``: Adam.step(closure), the closure running
                   zero_grad, forward, loss, backward
    unrecorded     a step of record that is not recorded: the loop's step with the Recorder hook
    capture        a recorded step's capture: + the probe's extra backward pass
    capture+write  capture, then RunWriter.write_step(dense_budget=0) and, at most every
                   CHECKPOINT_INTERVAL_S, the resume checkpoint: a whole recorded step of
                   ``record --dense-budget 0``

The dense blocks that the default budget admits (``--dense-budget 1GiB``) are timed on one
recorded step apart, since they cost seconds. Targets: capture+write at most 2.5x plain
Adam; unrecorded steps at most 1.05x.

The write is timed with record's default compression, lz4 (``--compression`` picks
another; fisherlab.store tabulates them). record writes synchronously, inside the step, so
the CPU time of the process is the whole cost of a step, and the targets are checked
against it. A writer thread that compresses while the next steps train was tried and left
out: it can only save wall time where a core sits idle, and none does when torch's threads
or other processes take them all. Timed on runs of recorded steps (blocks of six per mode,
round robin, load 3.7 to 4.0 on two cores), it made a recorded step slower, not faster:
wall 3.87x plain Adam against 2.99x synchronous on CURVES, 2.06x against 1.78x on MNIST,
with more CPU time too (2.74x against 2.35x; 2.03x against 1.86x). It would also charge
the write's CPU time to the steps that follow it.

Usage:
    python benchmarks/bench_record.py                      # curves and mnist, 20 steps a mode
    python benchmarks/bench_record.py --problems mnist --steps 40 --threads 2 --no-dense
    python benchmarks/bench_record.py --no-dense --compression gzip   # the portable, slower write
"""

from __future__ import annotations

import argparse
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
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_DENSE_BUDGET,
    RunWriter,
)
from fisherlab.training import build_optimizer

MODES = ("plain Adam", "unrecorded", "capture", "capture+write")
TARGETS = {"capture+write": 2.5, "unrecorded": 1.05}


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


def bench(name: str, steps: int, dense: bool, workdir: Path, compression: str) -> None:
    """Time the four modes on one problem and print its table."""
    problem = get_problem(name)
    batches, source = _data(name, problem.batch_size, 8)
    model = problem.build_model(seed=0)
    adam = build_optimizer("adam", model, problem, lr=1e-3)
    layers = list(range(1, problem.num_layers + 1))
    # every=1 captures at every step, every=2 at none of the odd steps the unrecorded mode takes.
    capturing, idle = Recorder(model, problem, layers, every=1), Recorder(model, problem, layers, every=2)
    out = workdir / f"{name}.h5"
    writer = RunWriter(out, {"problem": name}, capturing.probe.layer_shapes, force=True, compression=compression)
    ckpt = Checkpoint(workdir / f"{name}.resume.pt", {"problem": name})
    counter = iter(range(10**8))
    recorded_bytes = []
    split = {"HDF5 write": [], "checkpoint": []}  # CPU seconds inside capture+write
    last_checkpoint = [time.monotonic()]

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

    def full(x: torch.Tensor) -> None:
        step = next(counter)
        size = out.stat().st_size
        loss, stats = loop_step(capturing, x, step)
        start = time.process_time()
        writer.write_step(step, 0, loss, stats, dense_budget=0)
        middle = time.process_time()
        split["HDF5 write"].append(middle - start)
        if time.monotonic() - last_checkpoint[0] >= CHECKPOINT_INTERVAL_S:  # record's policy
            ckpt.save({"model": model.state_dict(), "optimizer": adam.state_dict(), "step": step + 1})
            split["checkpoint"].append(time.process_time() - middle)
            last_checkpoint[0] = time.monotonic()
        recorded_bytes.append(out.stat().st_size - size)

    run = {
        "plain Adam": plain,
        "unrecorded": lambda x: loop_step(idle, x, 1),
        "capture": lambda x: loop_step(capturing, x, 0),
        "capture+write": full,
    }
    wall = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    for mode in MODES:  # warm-up: allocator, Adam state, HDF5 file
        run[mode](batches[0])
    # Round robin, one step of each mode in turn, so that other load hits every mode alike; the
    # order rotates because the step after a file write runs on colder caches.
    for i in range(steps):
        for mode in MODES[i % len(MODES) :] + MODES[: i % len(MODES)]:
            x = batches[i % len(batches)]
            start, start_cpu = time.perf_counter(), time.process_time()
            run[mode](x)
            wall[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)

    print(
        f"\n{name}: batch {problem.batch_size}, {problem.num_parameters:,} parameters, {len(layers)} layers "
        f"recorded, {source}, {torch.get_num_threads()} threads, {steps} steps a mode, {compression} compression"
    )
    print(f"{'mode':<16}{'wall s':>9}{'x plain':>9}{'CPU s':>9}{'x plain':>9}  target (CPU)")
    med = {mode: (statistics.median(wall[mode]), statistics.median(cpu[mode])) for mode in MODES}
    base = med["plain Adam"]
    for mode in MODES:
        (w, c), target = med[mode], TARGETS.get(mode)
        verdict = "" if target is None else f"{target:.2f}: " + ("met" if c / base[1] <= target else "MISSED")
        print(f"{mode:<16}{w:>9.3f}{w / base[0]:>9.2f}{c:>9.3f}{c / base[1]:>9.2f}  {verdict}")
    w, c = ((99 * med["unrecorded"][k] + med["capture+write"][k]) / 100 for k in (0, 1))
    print(f"{'every 100, avg':<16}{w:>9.3f}{w / base[0]:>9.2f}{c:>9.3f}{c / base[1]:>9.2f}")
    parts = ", ".join(
        f"{k} {statistics.median(v):.3f} s ({statistics.median(v) / base[1]:.2f}x, {len(v)} times)"
        for k, v in split.items()
        if v
    )
    print(f"capture+write CPU includes: {parts}")
    print(f"HDF5 per recorded step, statistics only: {statistics.median(recorded_bytes[1:]) / 1e6:.2f} MB")

    if dense:
        size = out.stat().st_size
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, stats = loop_step(capturing, batches[0], next(counter))
        writer.write_step(10**7, 0, loss, stats, dense_budget=DEFAULT_DENSE_BUDGET)
        seconds, seconds_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        admitted = [i for i, s in stats.items() if 4 * s.p**2 <= DEFAULT_DENSE_BUDGET]
        print(
            f"recorded step with the dense blocks of the default budget (layers {admitted}): {seconds:.1f} s wall "
            f"({seconds / base[0]:.0f}x plain), {seconds_cpu:.1f} s CPU, {(out.stat().st_size - size) / 1e6:.1f} MB"
        )
    writer.close()


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
        "--compression",
        default=DEFAULT_COMPRESSION,
        choices=list(COMPRESSIONS),
        help=f"of the run file (default: record's, {DEFAULT_COMPRESSION})",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.problems:
            bench(name, args.steps, not args.no_dense, Path(tmp), args.compression)


if __name__ == "__main__":
    main()
