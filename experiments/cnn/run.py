"""Runner of the CNN experiment: record an Adam run of ``mnist-cnn`` and analyze every layer.

``results/<profile>/mnist-cnn/`` gets ``run.h5`` (not committed) and ``errors.csv``; a rerun
resumes the recording and skips the blocks already analyzed. Then ``plot.py`` draws
``figures/cnn_errors_<profile>.{png,pdf}``.

Usage::

    python experiments/cnn/run.py --profile cpu [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fisherlab.study import study

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    config = json.loads((HERE / "config.json").read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=list(config["profiles"]))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    settings = dict(config["profiles"][args.profile])
    problem = settings.pop("problem")
    out = HERE / "results" / args.profile / problem
    done = study(problem, out, resume=(out / "run.h5").exists(), device=args.device, data_dir=args.data_dir,
                 say=print, **settings)
    print(f"errors table: {done.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
