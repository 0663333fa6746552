"""Runner for Figure 1: record an Adam run per problem (layer 5 only), then analyze it.

Each entry of a profile (a problem, or a named variant with ``"problem"`` and options such as
``"linear_code"``) goes to ``results/<profile>/<entry>/``: ``run.h5`` (recorded statistics and
the analysis, not committed) and ``errors.csv``. What exists is reused: a finished
recording is not redone (an interrupted one is resumed) and the analysis skips the blocks
it already holds. Then ``plot.py`` draws the figures.

Usage::

    python experiments/fig1/run.py --profile cpu
    python experiments/fig1/run.py --profile full --problems mnist --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fisherlab.analysis import analyze
from fisherlab.record import record
from fisherlab.store import RunReader

HERE = Path(__file__).resolve().parent


def load_config(profile: str) -> dict:
    config = json.loads((HERE / "config.json").read_text())
    if profile not in config["profiles"]:
        raise SystemExit(f"unknown profile {profile!r}; choose from {', '.join(config['profiles'])}")
    return config


def recorded(run: Path) -> bool:
    if not run.exists():
        return False
    with RunReader(run) as reader:
        return reader.finished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--problems", nargs="*", help="default: every problem of the profile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    config = load_config(args.profile)
    problems = config["profiles"][args.profile]["problems"]
    for problem in args.problems or list(problems):
        settings = problems[problem]
        out = HERE / "results" / args.profile / problem
        out.mkdir(parents=True, exist_ok=True)
        run = out / "run.h5"
        if not recorded(run):
            print(f"== {problem}: recording layer {config['layer']} ({settings})", flush=True)
            record(
                settings.get("problem", problem), run, epochs=settings["epochs"], every=settings["every"],
                layers=[config["layer"]], fisher=config["fisher"], mc_samples=config["mc_samples"], dense_budget=0,
                seed=config["seed"], data_dir=args.data_dir, device=args.device, resume=run.exists(),
                linear_code=settings.get("linear_code", False),
            )
        print(f"== {problem}: analyzing", flush=True)
        analyze(run, out_dir=out, methods=config["methods"], device=args.device, error2_rtol=config["error2_rtol"])


if __name__ == "__main__":
    main()
