"""Cost of a recorded step of mnist-cnn (LeNet-5) against a plain Adam step, through the Recorder.

Modes, on one batch of MNIST-shaped random images (timings do not depend on the pixels),
timed round robin in an order shuffled every round (machine noise, and the memory a recorded
step leaves to the step after it, hit every mode alike), median wall-clock seconds of
``--steps`` steps each, one torch thread:

    adam            forward, cross-entropy, backward, Adam step; no Recorder
    unrecorded      the same step through a Recorder with a run file that is not due at it
    capture_reduce  + BlockCapture of every layer, one MC draw, KFAC-reduce (record --kfac reduce)
    capture_expand  + the same with KFAC-expand alone (record --kfac-both false)
    capture_both    + the same with both KFAC forms (record's default)
    record          capture_both and the step written to a run file: what ``fisherlab record
                    --problem mnist-cnn --dense-budget 0`` does at a recorded step (lzf)
    record_none     record with --compression none: the write's floor

Usage:
    python benchmarks/bench_record_cnn.py --batch 512 --steps 21
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from fisherlab.problems import lenet5
from fisherlab.record import DEFAULT_EVERY, Recorder
from fisherlab.store import RunWriter

#: The most a mode may cost, in Adam steps (issue 12).
TARGETS = {"unrecorded": 1.05, "record": 2.5}


def header(argv: list[str]) -> str:
    """The results' first line: the command, the date, the commit and the versions."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    return (f"# python {' '.join(argv)}, {date.today().isoformat()}, commit {commit}{' (modified)' if dirty else ''}, "
            f"torch {torch.__version__}, 1 thread")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = lenet5()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    layers = range(1, 6)
    step_of = {"n": 1}

    def step(hook: Recorder | None) -> float:
        while step_of["n"] % DEFAULT_EVERY == 0:  # the unrecorded mode's Recorder is due there
            step_of["n"] += 1
        start = time.perf_counter()
        opt.zero_grad()
        out = model(x) if hook is None else hook.forward(model, x, step_of["n"], y)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        if hook is not None:
            hook.after_step(step_of["n"], 0, 0.0)
        step_of["n"] += 1
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        specs = Recorder(model, "categorical", layers).layer_specs(x[:1])
        writers = {name: RunWriter(Path(tmp) / f"{name}.h5", {}, specs, compression=compression)
                   for name, compression in (("unrecorded", "lzf"), ("record", "lzf"), ("record_none", "none"))}
        modes = {
            "adam": None,
            "unrecorded": Recorder(model, "categorical", layers, writer=writers["unrecorded"]),
            "capture_reduce": Recorder(model, "categorical", layers, every=1, kfac="reduce"),
            "capture_expand": Recorder(model, "categorical", layers, every=1, kfac_both=False),
            "capture_both": Recorder(model, "categorical", layers, every=1),
            "record": Recorder(model, "categorical", layers, every=1, writer=writers["record"]),
            "record_none": Recorder(model, "categorical", layers, every=1, writer=writers["record_none"]),
        }
        for hook in modes.values():  # warm-up
            step(hook)
        times = {name: [] for name in modes}
        order = random.Random(0)
        names = list(modes)
        for _ in range(args.steps):
            order.shuffle(names)
            for name in names:
                times[name].append(step(modes[name]))
        for writer in writers.values():
            writer.close()
    adam = statistics.median(times["adam"])
    print(header(sys.argv))
    print(f"mnist-cnn (LeNet-5), batch {args.batch}, 1 thread, median of {args.steps} steps a mode, round robin")
    for name, values in times.items():
        median = statistics.median(values)
        target = f"  target <= {TARGETS[name]}" if name in TARGETS else ""
        print(f"{name:15s} {median * 1e3:7.1f} ms  {median / adam:5.2f} Adam steps{target}")


if __name__ == "__main__":
    main()
