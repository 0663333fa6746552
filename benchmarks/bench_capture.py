"""Seconds per step of capturing every layer's exact block of a LeNet-5 against a plain Adam step.

Modes, timed round robin on the same model and random MNIST-shaped batches (timings do not
depend on the pixel values), median CPU time of the process per step:

    adam      zero_grad, forward, cross-entropy, backward, Adam step
    mc        the same step with BlockCapture: + one backward pass to the layers' outputs for
              targets drawn from the model, unfolding, the per-sample P_n (dense storage) and
              the KFAC factors of --kfac's form; nothing written
    exact     the same with fisher="exact": 10 backward passes (one per class), batched

Usage:
    python benchmarks/bench_capture.py --batch 512 --steps 10 --threads 1 --kfac expand
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fisherlab.capture import BlockCapture


def lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kfac", choices=("expand", "reduce"), default="expand",
                        help="the KFAC form computed for the convolutions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def step(fisher: str | None) -> None:
        opt.zero_grad()
        if fisher is None:
            loss_fn(model(x), y).backward()
        else:
            with BlockCapture(model, kfac=args.kfac) as capture:
                out = model(x)
                kwargs = {"generator": gen} if fisher == "mc" else {}
                capture.capture(out, "categorical", fisher=fisher, **kwargs)
                loss_fn(out, y).backward()
        opt.step()

    modes = {"adam": None, "mc": "mc", "exact": "exact"}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for fisher in modes.values():  # warm-up
        step(fisher)
    for _ in range(args.steps):
        for name, fisher in modes.items():
            start = time.process_time()
            step(fisher)
            times[name].append(time.process_time() - start)
    base = statistics.median(times["adam"])
    print(f"LeNet-5, batch {args.batch}, {args.threads} thread(s), KFAC-{args.kfac}, "
          f"median CPU seconds per step of {args.steps}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:6s} {med:8.4f} s  {med / base:5.2f}x Adam")


if __name__ == "__main__":
    main()
