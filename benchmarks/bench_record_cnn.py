"""Cost of a recorded step of mnist-cnn (LeNet-5) against a plain Adam step, through the Recorder.

Modes, on one batch of MNIST-shaped random images (timings do not depend on the pixels),
median wall-clock seconds of ``--steps`` steps each, one torch thread:

    adam            forward, cross-entropy, backward, Adam step (the Recorder not due)
    capture_both    + BlockCapture with one MC draw and both KFAC forms (record --kfac-both)
    capture_expand  + BlockCapture computing KFAC-expand alone (record's default)
    capture_reduce  + BlockCapture computing KFAC-reduce alone (record --kfac reduce)
    record_both     capture_both and the step written to a run file (lzf, no dense blocks)

Usage:
    python benchmarks/bench_record_cnn.py --batch 512 --steps 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fisherlab.problems import lenet5
from fisherlab.record import Recorder
from fisherlab.store import RunWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = lenet5()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    plain = Recorder(model, "categorical", range(1, 6), every=10**9)
    both = Recorder(model, "categorical", range(1, 6), every=1, kfac_both=True)
    expand = Recorder(model, "categorical", range(1, 6), every=1)
    reduce = Recorder(model, "categorical", range(1, 6), every=1, kfac="reduce")
    step_of = {"n": 1}

    def step(hook: Recorder) -> float:
        start = time.perf_counter()
        opt.zero_grad()
        out = hook.forward(model, x, step_of["n"], y)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        hook.after_step(step_of["n"], 0, 0.0)
        step_of["n"] += 1
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        writer = RunWriter(Path(tmp) / "run.h5", {}, both.layer_specs(x[:1]))
        recording = Recorder(model, "categorical", range(1, 6), every=1, writer=writer, kfac_both=True)
        modes = {"adam": plain, "capture_both": both, "capture_expand": expand, "capture_reduce": reduce,
                 "record_both": recording}
        for hook in modes.values():  # warm-up
            step(hook)
        times = {name: [] for name in modes}
        for _ in range(args.steps):  # round robin: machine noise hits every mode alike
            for name, hook in modes.items():
                times[name].append(step(hook))
        writer.close()
    adam = statistics.median(times["adam"])
    print(f"mnist-cnn (LeNet-5), batch {args.batch}, 1 thread, median of {args.steps} steps")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:15s} {median * 1e3:7.1f} ms  {median / adam:5.2f} Adam steps")


if __name__ == "__main__":
    main()
