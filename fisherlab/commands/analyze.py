"""``fisherlab analyze RUN.h5``: every Kronecker approximation on every recorded step and layer."""

from __future__ import annotations

import argparse
import csv
import sys

from fisherlab.analysis import DEFAULT_METHODS, DTYPES, FAILED, ZERO_BLOCK, analyze
from fisherlab.device import DEFAULT_DEVICE, DEVICE_HELP, resolve_device
from fisherlab.errors import UserInputError
from fisherlab.kron import METHODS


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,5"`` → ``[1, 5]``; a clear error otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserInputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserInputError(f"{what} must not be empty")
    return values


def add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``analyze`` and ``study``."""
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods among {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument("--rank", type=int, help="Kronecker terms for the methods that take a rank (paper: 2)")
    parser.add_argument("--analysis-layers", help="comma-separated recorded layers to analyze (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="analysis precision")
    parser.add_argument("--no-warm-start", action="store_true", help="start each power/Lanczos fit afresh")
    parser.add_argument("--tol", type=float, help="relative residual tolerance of the iterations (default 1e-6)")
    parser.add_argument(
        "--error2-rtol", type=float, default=0.0,
        help="relative half-width allowed on Error 2 of large multi-term approximations (default 0: exact)",
    )
    parallel = parser.add_mutually_exclusive_group()
    parallel.add_argument(
        "--workers", type=int, metavar="N",
        help="analyze the blocks on a local Dask cluster of N processes (needs the dask extra)",
    )
    parallel.add_argument(
        "--scheduler", metavar="ADDRESS", help="address of a running dask.distributed scheduler to analyze the blocks on"
    )


def analysis_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`fisherlab.analysis.analyze` from the shared options."""
    return {
        "methods": [m.strip() for m in args.methods.split(",") if m.strip()],
        "rank": args.rank,
        "layers": parse_int_list(args.analysis_layers, "--analysis-layers") if args.analysis_layers else None,
        "dtype": args.dtype,
        "warm_start": not args.no_warm_start,
        "tol": args.tol,
        "error2_rtol": args.error2_rtol,
        "workers": args.workers,
        "scheduler": args.scheduler,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``analyze``'s options to its sub-parser."""
    parser.add_argument("run", help="HDF5 run file written by `fisherlab record`")
    parser.add_argument("--out", help="directory for errors.csv (default: beside the run file)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--strict", action="store_true",
        help="exit with status 1 if any fit failed (default: record its reason in the status column and exit 0)",
    )
    add_analysis_options(parser)


def run(args: argparse.Namespace) -> int:
    """Analyze the run file ``args`` names; 0 on success, 1 with ``--strict`` where a fit failed."""
    device = str(resolve_device(args.device))
    table = analyze(args.run, out_dir=args.out, device=device, progress=not args.quiet, **analysis_kwargs(args))
    print(f"errors table: {table}")
    with open(table, newline="") as fh:
        statuses = [row["status"] for row in csv.DictReader(fh)]
    failed = sum(s.startswith(FAILED) for s in statuses)
    zero = statuses.count(ZERO_BLOCK)
    if zero:
        print(f"{zero} of {len(statuses)} results are on zero blocks (dead layers): their errors are left empty")
    if failed:
        print(f"{failed} of {len(statuses)} results failed; their reasons are in the status column", file=sys.stderr)
    return 1 if failed and args.strict else 0
