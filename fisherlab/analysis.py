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
Every result carries a ``status``: :data:`OK`; :data:`ZERO_BLOCK` where ``F`` is zero to
rounding (a layer under dead ReLUs: ``g ≡ 0``), whose relative errors are undefined and left
empty (every fitter returns the zero operator there); or ``failed: <reason>`` where the fit
or its errors raised, the analysis going on with the next one. Failed results are retried
by the next run; results of older files without a status read as :data:`OK`.

With ``workers`` or ``scheduler`` the (step, layer) blocks run on a Dask cluster (the
``dask`` extra). The client alone opens the run file (for writing, so HDF5's lock refuses
a second analysis of the same file) and ships each block's statistics with its task; the
workers return the results and the client writes them, so a killed worker only costs its
task, which Dask reruns. With warm starts, the task of a step takes the previous step's
task of the same layer as its input, so each layer's steps run in order, its fits seeded
exactly as in the serial loop: the results equal the serial ones bit for bit (float64, one
torch thread per process, as Dask's workers get). Layers run in parallel; without warm
starts every block does.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fisherlab.errors import UserInputError
from fisherlab.io import atomic_write
from fisherlab.kron import METHODS, ExactReference, FitResult, current_name, fit, kronecker_svd
from fisherlab.kron.shared import KFAC_FORMS
from fisherlab.kron.stats import BlockStats
from fisherlab.store import RunReader

#: Every method of the registry, in its order (the paper's, then the exact Kronecker SVD).
DEFAULT_METHODS = tuple(METHODS)
#: Pseudo-method under which the exact block's own spectrum and profile are stored.
EXACT = "exact_block"
#: Rows of KFAC in the form a shared-weight layer was not recorded in, where its factors were
#: stored too (``record(kfac_both=True)``, docs/design.md §9.4): ``kfac`` is the recorded
#: form, ``kfac_expand`` or ``kfac_reduce`` the other one.
KFAC_VARIANTS = {form: f"kfac_{form}" for form in KFAC_FORMS}
#: Columns of ``errors.csv`` (docs/design.md §6).
COLUMNS = (
    "step", "epoch", "layer", "method", "rank", "error1", "error2", "seconds", "iterations",
    "residual", "converged", "warm_started", "error_seconds", "error2_halfwidth", "status",
)
DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: Status of a result whose errors are defined.
OK = "ok"
#: Status of a result on a block that is zero to rounding (its errors are left empty).
ZERO_BLOCK = "zero block"
#: Prefix of the status of a result that raised; the one-line reason follows.
FAILED = "failed"
#: How to get the optional engine of ``workers`` and ``scheduler``.
DASK_HINT = 'parallel analysis needs Dask: pip install "dask[distributed]" (or the fisherlab[dask] extra)'
#: Seconds to wait for a ``scheduler`` to answer.
CONNECT_TIMEOUT_S = 30


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
    workers: int | None = None,
    scheduler: str | None = None,
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
        workers: run the blocks on a local Dask cluster of this many processes (one thread
            each); None runs them in this process. The workers are spawned processes: a
            script that passes ``workers`` needs the ``if __name__ == "__main__":`` guard.
        scheduler: address of a running ``dask.distributed`` scheduler to run them on instead
            (its workers need this fisherlab installed; the run file stays with the caller).

    Raises:
        UserInputError: a missing or foreign run file, a file open for writing elsewhere
            (another analysis), an unknown method, a layer that was not recorded, an invalid
            rank, dtype, device or worker count, Dask missing or its scheduler unreachable.
    """
    methods = resolve_methods(methods)
    if not error2_rtol >= 0:
        raise UserInputError(f"error2_rtol must be nonnegative, got {error2_rtol}")
    if rank is not None and rank < 1:
        raise UserInputError(f"rank must be a positive integer, got {rank}")
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device.startswith("cuda") and scheduler is None and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA device is available")
    if workers is not None and scheduler is not None:
        raise UserInputError("choose one of workers (a local cluster) and scheduler (an existing one)")
    if workers is not None and workers < 1:
        raise UserInputError(f"workers must be a positive integer, got {workers}")
    if workers is not None or scheduler is not None:
        _import_dask()
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
        settings = _Settings(tuple(methods), rank, DTYPES[dtype], device, warm_start, tol, error2_rtol)
        blocks = [(step, layer) for step in steps for layer in layers]
        bar = tqdm(total=len(blocks), desc="analyze", unit="block", disable=not progress)
        try:
            if workers is None and scheduler is None:
                _run_serial(reader, settings, blocks, bar)
            else:
                _run_dask(reader, settings, blocks, bar, workers, scheduler)
        finally:
            bar.close()
        return write_table(reader, out_dir / "errors.csv")


@dataclass(frozen=True)
class _Settings:
    methods: tuple[str, ...]
    rank: int | None
    dtype: torch.dtype
    device: str
    warm_start: bool
    tol: float | None
    error2_rtol: float


#: One result to write: ``(method, arrays, attrs)``.
Result = tuple[str, dict, dict]
#: The fits of a layer's latest step, by method, that warm-start its next step.
Warm = dict[str, FitResult]


def _done(reader: RunReader, step: int, layer: int, method: str) -> bool:
    """Whether a result needs no rerun: complete, and not failed (nor NaN from an older fisherlab).

    A result stored under a former name of the method counts.
    """
    names = [method, *METHODS[method].former_names] if method in METHODS else [method]
    return any(_stored_done(reader, step, layer, name) for name in names)


def _stored_done(reader: RunReader, step: int, layer: int, method: str) -> bool:
    attrs = reader.analysis_attrs(step, layer, method)
    if attrs is None:
        return False
    if "status" in attrs:
        return not attrs["status"].startswith(FAILED)
    return method == EXACT or all(math.isfinite(attrs.get(k) or 0.0) for k in ("error1", "error2"))


def _pending(reader: RunReader, settings: _Settings, step: int, layer: int) -> tuple[list[str], bool]:
    """The methods still to fit on a block (with KFAC's other form on a shared-weight layer), and
    whether its exact reference is still to store."""
    spec = reader.layer_specs[layer]
    methods = list(settings.methods)
    if spec.shared and "kfac" in methods:
        methods += [KFAC_VARIANTS[form] for form in reader.kfac_forms(step, layer) if form != spec.kfac_form]
    return [m for m in methods if not _done(reader, step, layer, m)], not _done(reader, step, layer, EXACT)


def _variant_form(method: str) -> str | None:
    """The KFAC form of a :data:`KFAC_VARIANTS` row, None for a registry method."""
    return next((form for form, name in KFAC_VARIANTS.items() if name == method), None)


def _rank_for(method: str, rank: int | None) -> int:
    return METHODS["kfac" if _variant_form(method) else method].rank_for(rank)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{FAILED}: {type(exc).__name__}" + (f": {text.splitlines()[0]}" if text else "")


def _failed(settings: _Settings, todo: list[str], need_exact: bool, exc: BaseException) -> list[Result]:
    """Results saying why a whole block could not be analyzed."""
    status = {"status": _reason(exc)}
    rows = [(EXACT, {}, status)] if need_exact else []
    return rows + [(m, {}, {"rank": _rank_for(m, settings.rank)} | status) for m in todo]


def _numpy(arrays: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in arrays.items() if v is not None}


def _analyze_block(
    settings: _Settings, stats: BlockStats, todo: list[str], need_exact: bool, warm: Warm,
    progress: Callable[..., None] | None = None,
) -> tuple[list[Result], Warm]:
    """Fit ``todo`` on one block and measure their errors; no file access (a Dask task).

    Returns the results to write and the fits that warm-start the layer's next step (``warm``
    updated with this step's; a fit without warm-start vectors, a zero block's or a failed
    one, drops its method's entry, so the next step starts afresh). ``progress`` is told the
    method in hand and the Error 2 solver's progress (:meth:`ExactReference.error2`).
    """
    try:
        stats = stats.to(device=settings.device)
        ref = ExactReference(stats)
    except Exception as exc:  # noqa: BLE001 - e.g. no such device on this worker: recorded, the others go on
        return _failed(settings, todo, need_exact, exc), dict(warm)
    status = ZERO_BLOCK if ref.zero else OK
    results: list[Result] = []
    if need_exact:
        try:
            profile = kronecker_svd(stats, rank=0).singular_values
            results.append((EXACT, _numpy({"eigenvalues": ref.eigenvalues, "kron_singular_values": profile}), {
                "frobenius_norm": float(ref.norm2.sqrt()), "n_samples": stats.n_samples, "p": stats.p, "status": status,
            }))
        except Exception as exc:  # noqa: BLE001 - recorded as the block's status, the analysis goes on
            results.append((EXACT, {}, {"status": _reason(exc)}))
    warm = dict(warm)
    for method in todo:
        form = _variant_form(method)
        block = stats
        if form is not None:  # KFAC in the form the layer was not recorded in (its factors are stored)
            block = stats.with_kfac(form)
        init = warm.pop(method, None) if settings.warm_start else None
        report = None if progress is None else partial(progress, method=method)
        if report is not None:
            report()
        try:
            record = METHODS["kfac" if form else method]
            options = dict(record.analysis_options)
            if settings.tol is not None and "tol" in options:
                options["tol"] = settings.tol
            result = fit(record.name, block, rank=record.rank_for(settings.rank), init=init, **options)
            start = time.perf_counter()
            if ref.zero:
                e1 = e2 = half = None
                eigenvalues = torch.zeros_like(ref.eigenvalues)
            else:
                e1 = ref.error1(result.op)
                spectral = ref.error2(result.op, rtol=settings.error2_rtol, progress=report)
                e2, half, eigenvalues = spectral.value, spectral.halfwidth, spectral.eigenvalues
            info = result.info
            results.append((method, _numpy({"eigenvalues": eigenvalues, "singular_values": info.singular_values}), {
                "error1": e1, "error2": e2, "error2_halfwidth": half,
                "seconds": info.seconds, "iterations": info.iterations,
                "residual": info.residual, "converged": bool(info.converged), "rank": result.op.rank,
                "warm_started": init is not None and record.warm_starts,
                "error_seconds": time.perf_counter() - start, "status": status,
            }))
        except Exception as exc:  # noqa: BLE001 - recorded as the row's status, the analysis goes on
            results.append((method, {}, {"rank": _rank_for(method, settings.rank), "status": _reason(exc)}))
            continue
        if result.warm is not None:
            warm[method] = result
    return results, warm


def _write(reader: RunReader, step: int, layer: int, results: list[Result]) -> None:
    for method, arrays, attrs in results:
        reader.write_analysis(step, layer, method, arrays, attrs)


def _run_serial(reader: RunReader, settings: _Settings, blocks: list[tuple[int, int]], bar: tqdm) -> None:
    warm: dict[int, Warm] = {}
    for step, layer in blocks:
        bar.set_postfix(step=step, layer=layer)
        todo, need_exact = _pending(reader, settings, step, layer)
        if todo or need_exact:
            try:
                stats = reader.stats(step, layer, settings.dtype)
            except Exception as exc:  # noqa: BLE001 - an unreadable block is recorded, the others go on
                _write(reader, step, layer, _failed(settings, todo, need_exact, exc))
            else:
                progress = partial(_postfix, bar, step=step, layer=layer)
                results, warm[layer] = _analyze_block(settings, stats, todo, need_exact, warm.get(layer, {}), progress)
                _write(reader, step, layer, results)
        bar.update()


def _postfix(bar: tqdm, **info) -> None:
    # A long block (minutes of exact Error 2) shows its method, Krylov dimension and accuracy.
    bar.set_postfix({k: f"{v:.1e}" if isinstance(v, float) else v for k, v in info.items()})


def _import_dask():
    try:
        import dask.distributed
    except ImportError:
        raise UserInputError(DASK_HINT) from None
    return dask.distributed


def _remote_block(settings: _Settings, stats: BlockStats, todo: list[str], need_exact: bool, previous) -> tuple:
    # ``previous``: the (results, warm) of the layer's previous task, which Dask passes in.
    return _analyze_block(settings, stats, todo, need_exact, previous[1] if previous is not None else {})


def _results_of(task: tuple) -> list[Result]:
    return task[0]


def _run_dask(
    reader: RunReader, settings: _Settings, blocks: list[tuple[int, int]], bar: tqdm,
    workers: int | None, scheduler: str | None,
) -> None:
    """The serial loop's blocks as Dask tasks, at most a few per worker in flight, the largest
    of each step first.

    Each block's statistics travel with its task; with warm starts the task also takes the
    previous task of its layer (its warm fits stay on the workers: only the results to write
    come back). A task whose worker dies is rerun by Dask from its inputs.
    """
    distributed = _import_dask()
    cluster = None
    environ = dict(os.environ)
    try:
        if scheduler is not None:
            try:
                client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ValueError) as exc:
                raise UserInputError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from exc
        else:
            cluster = local_cluster(workers)
            client = distributed.Client(cluster)
        with client:
            _schedule(client, distributed.as_completed(), reader, settings, iter(_largest_first(reader, blocks)), bar)
    finally:
        if cluster is not None:
            cluster.close()
            # The nannies (threads of this process) put the workers' variables into os.environ.
            for key in set(os.environ) - set(environ):
                del os.environ[key]
            os.environ.update(environ)


def _largest_first(reader: RunReader, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The blocks of each step by decreasing size ``p``, steps in order (a layer's warm-start
    chain keeps its order): the workers take the longest first and finish nearly together."""
    size = {i: (spec.d_in + spec.bias) * spec.d_out for i, spec in reader.layer_specs.items()}
    return sorted(blocks, key=lambda block: (block[0], -size[block[1]]))


#: glibc's largest mmap threshold (32 MiB on 64-bit systems).
MMAP_THRESHOLD = 2**25


def local_cluster(workers: int):
    """The ``dask.distributed.LocalCluster`` that ``analyze(workers=N)`` runs on: ``workers``
    one-thread processes, no dashboard.

    Dask gives its workers ``MALLOC_TRIM_THRESHOLD_``, which also turns off glibc's adaptive
    mmap threshold: every eigensolver temporary above 128 kB would then be mapped and
    page-faulted afresh (``benchmarks/results/bench_workers.txt``). A fixed threshold of 32 MiB
    keeps them on the heap.

    Raises:
        UserInputError: Dask is not installed (the message says how to install it).
    """
    distributed = _import_dask()
    import dask

    environ = dask.config.get("distributed.nanny.pre-spawn-environ", {}) | {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, silence_logs=logging.ERROR,
            # the scheduler's HTTP server on a free port, not Dask's default 8787
            dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
        )


def _schedule(client, done, reader: RunReader, settings: _Settings, blocks: Iterator, bar: tqdm) -> None:
    window = 2 * max(1, sum(client.nthreads().values()))
    last: dict[int, object] = {}  # layer → future of its latest task (the next one's warm start)
    keys: dict[object, tuple] = {}

    def submit_more() -> None:
        while len(keys) < window:
            block = next(blocks, None)
            if block is None:
                return
            step, layer = block
            todo, need_exact = _pending(reader, settings, step, layer)
            if not (todo or need_exact):
                bar.update()
                continue
            try:
                stats = reader.stats(step, layer, settings.dtype)
            except Exception as exc:  # noqa: BLE001 - an unreadable block is recorded, the others go on
                _write(reader, step, layer, _failed(settings, todo, need_exact, exc))
                bar.update()
                continue
            previous = last.get(layer) if settings.warm_start else None
            task = client.submit(_remote_block, settings, stats, todo, need_exact, previous, pure=False)
            if settings.warm_start:
                last[layer] = task
            results = client.submit(_results_of, task, pure=False)
            keys[results] = (step, layer, todo, need_exact)
            done.add(results)

    submit_more()
    for future in done:
        step, layer, todo, need_exact = keys.pop(future)
        try:
            results = future.result()
        except Exception as exc:  # noqa: BLE001 - a task that failed on the workers is recorded
            results = _failed(settings, todo, need_exact, exc)
        future.release()
        _write(reader, step, layer, results)
        bar.set_postfix(step=step, layer=layer)
        bar.update()
        submit_more()


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
        rows.append({"step": step, "epoch": epochs[step], "layer": layer, "method": method, "status": OK} | {
            k: attrs[k] for k in COLUMNS if k in attrs
        })
    order = {m: i for i, m in enumerate([*METHODS, *KFAC_VARIANTS.values()])}
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
        """The analyzed layers, ascending."""
        return sorted({r["layer"] for r in self.rows})

    @property
    def steps(self) -> list[int]:
        """The analyzed steps, ascending."""
        return sorted({r["step"] for r in self.rows})

    @property
    def methods(self) -> list[str]:
        """The methods with results, in the registry's order (:data:`METHODS`), then KFAC's
        other form on shared-weight layers (:data:`KFAC_VARIANTS`)."""
        seen = {r["method"] for r in self.rows}
        return [m for m in [*METHODS, *KFAC_VARIANTS.values()] if m in seen]

    def spectra(self, step: int, layer: int) -> dict[str, np.ndarray]:
        """Top eigenvalues of F (key :data:`EXACT`) and of each approximation at one step."""
        with RunReader(self.path) as reader:
            if not reader.analysis_done(step, layer, EXACT):
                raise UserInputError(f"no analysis of step {step}, layer {layer} in {self.path}")
            names = {EXACT: EXACT} | {m: stored for (s, i, m), stored in _analysis_methods(reader).items()
                                      if (s, i) == (step, layer)}
            return {method: reader.read_analysis(step, layer, stored)[0]["eigenvalues"] for method, stored in names.items()}

    def profiles(self, layer: int) -> tuple[list[int], list[np.ndarray]]:
        """The Kronecker singular-value profile of layer ``layer``'s block at every step."""
        with RunReader(self.path) as reader:
            steps = [s for s, i, m in reader.analysis_keys() if i == layer and m == EXACT]
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
