"""Fit every Kronecker approximation on every recorded step and layer of a run file.

For each completed step and layer the analysis stores, in the run file under
``/analysis/<step>/layer<i>/<method>`` (docs/design.md §5), Error 1 and Error 2 (matrix-free,
:class:`~fisherlab.kron.ExactReference`), the fit's seconds, iterations and residual, the
Kronecker singular values of the fitted terms and the top ``min(N, p)`` eigenvalues of the
approximation; under the pseudo-method :data:`EXACT` it stores ``‖F‖_F``, the top eigenvalues
of ``F`` and its whole Kronecker singular-value profile. Each result is written as it is
finished, so a killed analysis loses only the one in progress and a rerun skips what is done.
``errors.csv`` is then rebuilt from the file (one row per step, layer and method).

The iterative methods (:attr:`fisherlab.kron.Method.warm_starts`: kpsvd, deflation, lanczos,
kfac_corrected) are warm-started from the previous recorded step of the same layer, as in
the paper. Methods, ranks and fit options come from the registry :data:`fisherlab.kron.METHODS`.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.kron import METHODS, ExactReference, FitResult, current_name, fit, kronecker_svd
from fisherlab.store import RunReader

#: Every method of the registry, in its order (the paper's, then the exact Kronecker SVD).
DEFAULT_METHODS = tuple(METHODS)
#: Pseudo-method under which the exact block's own spectrum and profile are stored.
EXACT = "exact_block"
#: Columns of ``errors.csv`` (docs/design.md §6).
COLUMNS = (
    "step", "epoch", "layer", "method", "rank", "error1", "error2", "seconds", "iterations",
    "residual", "converged", "warm_started", "error_seconds", "error2_halfwidth",
)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def resolve_methods(methods: Iterable[str] | None) -> list[str]:
    """Validate method names (None means :data:`DEFAULT_METHODS`)."""
    methods = list(DEFAULT_METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        renamed = "".join(f" ({m} is now {current_name(m)})" for m in unknown if current_name(m) != m)
        raise UserInputError(
            f"unknown method {', '.join(unknown) or '(none given)'}{renamed}; choose from {', '.join(METHODS)}"
        )
    return methods


def analyze(
    run: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    methods: Iterable[str] | None = None,
    rank: int | None = None,
    layers: Iterable[int] | None = None,
    dtype: str = "float64",
    device: str = "cpu",
    warm_start: bool = True,
    tol: float | None = None,
    error2_rtol: float = 0.0,
    progress: bool = True,
) -> Path:
    """Analyze a run file; returns the path of the ``errors.csv`` written into ``out_dir``.

    Args:
        run: the HDF5 run file written by ``fisherlab record``.
        out_dir: where ``errors.csv`` goes (default: beside the run file).
        methods: names from the registry (default :data:`DEFAULT_METHODS`).
        rank: number of Kronecker terms for the methods that take one (default: the paper's).
        layers: 1-based layer indices (default: every recorded layer).
        dtype: ``"float64"`` (default) or ``"float32"``.
        device: ``"cpu"`` or ``"cuda"``.
        warm_start: start the iterative methods from the previous step's singular vectors.
        tol: relative residual tolerance of the power and Lanczos iterations (default: the
            methods' ``analysis_options``, 1e-6).
        error2_rtol: relative half-width allowed on Error 2 for large multi-term
            approximations (0: exact, with all ``min(N, p)`` eigenvalues of ``F̂``); the
            certified half-width is stored as ``error2_halfwidth``.
        progress: show a progress bar over steps × layers.

    Raises:
        UserInputError: a missing or foreign run file, an unknown method, a layer that was
            not recorded, an invalid rank, dtype or device.
    """
    methods = resolve_methods(methods)
    if not error2_rtol >= 0:
        raise UserInputError(f"error2_rtol must be nonnegative, got {error2_rtol}")
    if rank is not None and rank < 1:
        raise UserInputError(f"rank must be a positive integer, got {rank}")
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA device is available")
    out_dir = Path(run).parent if out_dir is None else Path(out_dir)
    with RunReader(run, mode="a") as reader:
        layers = list(reader.layers) if layers is None else list(layers)
        missing = [i for i in layers if i not in reader.layers]
        if missing:
            raise UserInputError(f"layer {missing[0]} was not recorded in {run} (layers: {list(reader.layers)})")
        steps = reader.steps()
        if not steps:
            raise UserInputError(f"{run} holds no completed step to analyze")
        out_dir.mkdir(parents=True, exist_ok=True)
        _Analysis(reader, methods, rank, DTYPES[dtype], device, warm_start, tol, error2_rtol).run(steps, layers, progress)
        return write_table(reader, out_dir / "errors.csv")


@dataclass
class _Analysis:
    reader: RunReader
    methods: list[str]
    rank: int | None
    dtype: torch.dtype
    device: str
    warm_start: bool
    tol: float | None
    error2_rtol: float

    def run(self, steps: list[int], layers: list[int], progress: bool) -> None:
        previous: dict[tuple[int, str], FitResult] = {}
        bar = tqdm(total=len(steps) * len(layers), desc="analyze", unit="block", disable=not progress)
        for step in steps:
            for layer in layers:
                bar.set_postfix(step=step, layer=layer)
                self._block(step, layer, previous)
                bar.update()
        bar.close()

    def _done(self, step: int, layer: int, method: str) -> bool:
        names = [method, *METHODS[method].former_names]
        return any(self.reader.analysis_done(step, layer, name) for name in names)

    def _block(self, step: int, layer: int, previous: dict) -> None:
        todo = [m for m in self.methods if not self._done(step, layer, m)]
        need_exact = not self.reader.analysis_done(step, layer, EXACT)
        if not todo and not need_exact:
            return
        stats = self.reader.stats(step, layer, self.dtype, self.device)
        ref = ExactReference(stats)
        if need_exact:
            profile = kronecker_svd(stats, rank=0).singular_values
            self.reader.write_analysis(
                step, layer, EXACT,
                {"eigenvalues": ref.eigenvalues, "kron_singular_values": profile},
                {"frobenius_norm": float(ref.norm2.sqrt()), "n_samples": stats.n_samples, "p": stats.p},
            )
        for method in todo:
            init = previous.get((layer, method)) if self.warm_start else None
            record = METHODS[method]
            options = dict(record.analysis_options)
            if self.tol is not None and "tol" in options:
                options["tol"] = self.tol
            result = fit(method, stats, rank=record.rank_for(self.rank), init=init, **options)
            previous[(layer, method)] = result
            start = time.perf_counter()
            e1 = ref.error1(result.op)
            spectral = ref.error2(result.op, rtol=self.error2_rtol)
            info = result.info
            self.reader.write_analysis(
                step, layer, method,
                {"eigenvalues": spectral.eigenvalues, "singular_values": info.singular_values},
                {
                    "error1": e1, "error2": spectral.value, "error2_halfwidth": spectral.halfwidth,
                    "seconds": info.seconds, "iterations": info.iterations,
                    "residual": info.residual, "converged": bool(info.converged), "rank": result.op.rank,
                    "warm_started": init is not None and record.warm_starts,
                    "error_seconds": time.perf_counter() - start,
                },
            )


def write_table(reader: RunReader, path: Path) -> Path:
    """Rebuild ``errors.csv`` from every complete result in the run file (atomic replace)."""
    rows = results_table(reader)

    def write(fh) -> None:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    return atomic_write(path, write, text=True)


def read_table(path: str | os.PathLike) -> list[dict]:
    """The rows of an ``errors.csv``, typed as :func:`results_table` gives them.

    Methods stored under a former name (:attr:`fisherlab.kron.Method.former_names`) read
    under the current one.

    Raises:
        UserInputError: the file is missing or is not an errors table.
    """
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise UserInputError(f"no such errors table: {path}") from None
    if rows and not {"step", "layer", "method"} <= set(rows[0]):
        raise UserInputError(f"{path} is not an errors table (it has no step, layer and method columns)")
    return [{k: _parse_cell(k, v) for k, v in row.items()} for row in rows]


def _parse_cell(column: str, text: str):
    if column == "method":
        return current_name(text)
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _analysis_methods(reader: RunReader) -> dict[tuple[int, int, str], str]:
    """``{(step, layer, current name): stored name}`` of every result but :data:`EXACT`.

    A result stored under a former name (:attr:`fisherlab.kron.Method.former_names`) reads
    under the current one; where a file holds both, the current one wins.
    """
    stored = {}
    for step, layer, method in reader.analysis_keys():
        if method != EXACT:
            key = (step, layer, current_name(method))
            if key not in stored or method == key[2]:
                stored[key] = method
    return stored


def results_table(reader: RunReader) -> list[dict]:
    """One dict per (step, layer, method) result, with the columns of :data:`COLUMNS`."""
    rows = []
    epochs = {}
    for (step, layer, method), stored in _analysis_methods(reader).items():
        if step not in epochs:
            epochs[step] = reader.step_attrs(step)["epoch"]
        _, attrs = reader.read_analysis(step, layer, stored)
        rows.append({"step": step, "epoch": epochs[step], "layer": layer, "method": method} | {
            k: attrs[k] for k in COLUMNS if k in attrs
        })
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["step"], r["layer"], order.get(r["method"], len(order))))


@dataclass
class Results:
    """An analyzed run, read back for plotting.

    Attributes:
        config: the run's recording configuration.
        rows: :func:`results_table`.
    """

    path: Path
    config: dict
    rows: list[dict]

    @property
    def layers(self) -> list[int]:
        return sorted({r["layer"] for r in self.rows})

    @property
    def steps(self) -> list[int]:
        return sorted({r["step"] for r in self.rows})

    @property
    def methods(self) -> list[str]:
        seen = {r["method"] for r in self.rows}
        return [m for m in METHODS if m in seen]

    def spectra(self, step: int, layer: int) -> dict[str, np.ndarray]:
        """Top eigenvalues of F (key :data:`EXACT`) and of each approximation at one step."""
        with RunReader(self.path) as reader:
            if not reader.analysis_done(step, layer, EXACT):
                raise UserInputError(f"no analysis of step {step}, layer {layer} in {self.path}")
            names = {EXACT: EXACT} | {m: stored for (s, l, m), stored in _analysis_methods(reader).items()
                                      if (s, l) == (step, layer)}
            return {method: reader.read_analysis(step, layer, stored)[0]["eigenvalues"] for method, stored in names.items()}

    def profiles(self, layer: int) -> tuple[list[int], list[np.ndarray]]:
        """The Kronecker singular-value profile of layer ``layer``'s block at every step."""
        with RunReader(self.path) as reader:
            steps = [s for s, l, m in reader.analysis_keys() if l == layer and m == EXACT]
            if not steps:
                raise UserInputError(f"no analysis of layer {layer} in {self.path}")
            return steps, [reader.read_analysis(s, layer, EXACT)[0]["kron_singular_values"] for s in steps]


def load_results(run: str | os.PathLike) -> Results:
    """Read an analyzed run file.

    Raises:
        UserInputError: the file is missing, foreign, or holds no analysis.
    """
    with RunReader(run) as reader:
        rows = results_table(reader)
        if not rows:
            raise UserInputError(f"{run} holds no analysis yet; run `fisherlab analyze {run}` first")
        return Results(Path(run), reader.config, rows)
