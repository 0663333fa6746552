"""Figures of an analyzed run: errors over training, error heatmaps, spectra, Kronecker profiles.

Every function takes plain data (the rows of the results table, arrays of eigenvalues or
singular values), writes one PNG and one PDF named ``<stem>.png`` and ``<stem>.pdf`` into
``out_dir`` and returns their paths. :func:`plot_run` draws all of them from a
:class:`fisherlab.analysis.Results`.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot: no
global backend or figure registry is touched, so plotting works headless and leaks nothing.
Methods keep the colours, markers and names of :mod:`fisherlab.plots.style`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fisherlab.errors import UserInputError
from fisherlab.plots import style
from fisherlab.plots.style import save_figure

if TYPE_CHECKING:
    from fisherlab.analysis import Results

#: Status of a result on a block that is zero to rounding (``fisherlab.analysis.ZERO_BLOCK``,
#: not imported: that module imports torch).
ZERO_BLOCK = "zero block"

#: The two errors of docs/design.md §2.4: column of the results table → (name, kind, formula).
ERRORS = {
    "error1": ("Error 1", "relative Frobenius", "‖F − F̂‖$_F$ / ‖F‖$_F$"),
    "error2": ("Error 2", "relative spectral ℓ2", "‖λ(F) − λ(F̂)‖$_2$ / ‖λ(F)‖$_2$"),
}
#: Data spanning more than this ratio (largest / smallest positive value) get a log axis.
LOG_RANGE = 20.0
#: Eigenvalues and singular-value ratios within this many machine epsilons of zero (relative
#: to the largest) are round-off, not signal, and are left out of log-scale plots.
ROUNDOFF_EPS = 10
#: The paper's Figure 1 shows this layer; :func:`plot_run` defaults to it when it was recorded.
PAPER_LAYER = 5


def describe_run(config: Mapping) -> str:
    """One line saying what was run, from a run's config (missing keys are left out).

    Example: ``"curves · Adam · Fisher: mc, 1 MC sample · batch 256"``.
    """
    parts = []
    if config.get("problem") is not None:
        parts.append(str(config["problem"]) + (" (linear code layer)" if config.get("linear_code") else ""))
    optimizer = config.get("optimizer")
    if isinstance(optimizer, Mapping):  # the config may hold the optimizer with its settings
        optimizer = optimizer.get("name")
    if optimizer is not None:
        parts.append(style.label(str(optimizer)))
    fisher = config.get("fisher_type")
    if fisher is not None:
        samples = config.get("mc_samples")
        if fisher == "mc" and samples is not None:
            fisher = f"{fisher}, {samples} MC sample{'' if samples == 1 else 's'}"
        parts.append(f"Fisher: {fisher}")
    if config.get("batch_size") is not None:
        parts.append(f"batch {config['batch_size']}")
    return " · ".join(parts) or "fisherlab run"


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in the paper's order (that of :data:`fisherlab.plots.style.LABELS`), others after."""
    known = list(style.LABELS)
    methods = set(methods)
    return [m for m in known if m in methods] + sorted(methods - set(known))


def plot_errors(
    rows: Sequence[Mapping], layer: int, out_dir: str | os.PathLike, *, title: str = "", stem: str | None = None
) -> list[Path]:
    """Error 1 and Error 2 of one layer against the training step, one line per method.

    The paper's Figure 1 (for layer 5). A panel gets a log y-axis when its values span more
    than :data:`LOG_RANGE`, a linear one from 0 otherwise. A step whose error is undefined
    (a zero block) or whose fit failed leaves a gap in its line.

    Args:
        rows: results-table rows with at least ``step, layer, method, error1, error2``.
        layer: the 1-based layer to draw.
        out_dir: where the figure goes (created if needed).
        title: what was run (:func:`describe_run`); the layer is appended.
        stem: file name without suffix (default ``errors_layer<layer>``).

    Raises:
        UserInputError: if ``rows`` hold nothing for ``layer``.
    """
    rows = [r for r in rows if r["layer"] == layer]
    if not rows:
        raise UserInputError(f"no results for layer {layer}")
    methods = method_order(r["method"] for r in rows)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, (key, (name, kind, formula)) in zip(axes, ERRORS.items()):
        for method in methods:
            points = sorted((r["step"], _error(r, key)) for r in rows if r["method"] == method)
            steps, values = zip(*points)
            ax.plot(
                steps, values, color=style.color(method), marker=style.marker(method) or None,
                markevery=_markevery(len(steps)), markersize=5, linewidth=1.5, label=style.label(method),
            )
        _scale_y(ax, [_error(r, key) for r in rows])
        ax.set_xlabel("training step (iteration)")
        ax.set_ylabel(f"{name} = {formula}")
        ax.set_title(f"{name} ({kind})")
        ax.grid(True, which="major", alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="approximation")
    fig.suptitle(_join(title, f"layer {layer}"))
    return save_figure(fig, out_dir, stem or f"errors_layer{layer}")


def plot_error_heatmap(
    rows: Sequence[Mapping],
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    title: str = "",
    stem: str | None = None,
) -> list[Path]:
    """Layer × method heatmaps of Error 1 and Error 2: at one step and averaged over steps.

    Top row: the errors at ``step``; bottom row: their arithmetic mean over every recorded
    step. The two panels of one error share a colour scale (logarithmic when the values span
    more than :data:`LOG_RANGE`); cells are annotated; missing, failed or non-finite results
    are left blank; the mean leaves out zero blocks (status ``zero block``), whose errors are
    undefined.

    Args:
        rows: results-table rows with at least ``step, layer, method, error1, error2``.
        out_dir: where the figure goes.
        step: the step of the top row (default: the last one in ``rows``).
        title: what was run (:func:`describe_run`).
        stem: file name without suffix (default ``error_heatmap_step<step>``).

    Raises:
        UserInputError: if ``rows`` is empty or holds nothing for ``step``.
    """
    if not rows:
        raise UserInputError("no results to draw")
    steps = sorted({r["step"] for r in rows})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserInputError(f"no results for step {step} (steps: {_listing(steps)})")
    layers = sorted({r["layer"] for r in rows})
    methods = method_order(r["method"] for r in rows)
    cells: dict[tuple[int, str], list[Mapping]] = {}
    for r in rows:
        cells.setdefault((r["layer"], r["method"]), []).append(r)
    grids = {}
    for key in ERRORS:
        at_step = np.full((len(layers), len(methods)), np.nan)
        mean = np.full_like(at_step, np.nan)
        for (layer, method), cell in cells.items():
            i, j = layers.index(layer), methods.index(method)
            values = {r["step"]: _error(r, key) for r in cell if r.get("status") != ZERO_BLOCK}
            at_step[i, j] = values.get(step, np.nan)
            # Zero blocks have no error to average; a failed (NaN) fit stays visible as a blank.
            mean[i, j] = np.mean(list(values.values())) if values else np.nan
        grids[key] = (at_step, mean)
    # Height grows with the layers, with a floor that leaves room for the colour-bar labels.
    fig = Figure(figsize=(2.4 + 1.9 * len(methods), max(5.5, 1.6 + 0.9 * len(layers))), layout="constrained")
    axes = fig.subplots(2, 2)
    row_titles = (f"at step {step}", f"mean over {len(steps)} recorded step{'s' * (len(steps) > 1)}")
    for col, (key, at_step_mean) in enumerate(grids.items()):
        norm = _norm(np.concatenate([g.ravel() for g in at_step_mean]))
        for row, grid in enumerate(at_step_mean):
            ax = axes[row, col]
            image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", norm=norm, aspect="auto")
            _annotate(ax, grid, image)
            ax.set_xticks(range(len(methods)), [style.label(m) for m in methods], rotation=30, ha="right")
            ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
            for tick, method in zip(ax.get_xticklabels(), methods):
                tick.set_color(style.color(method) or "black")
            ax.set_title(f"{ERRORS[key][0]}, {row_titles[row]}")
        name, kind, _ = ERRORS[key]
        bar = fig.colorbar(image, ax=axes[:, col], label=f"{name}, {kind} (lower is better)", shrink=0.9)
        if isinstance(norm, LogNorm):
            _plain_log_labels(bar.ax.yaxis)
    fig.suptitle(_join(title, "errors by layer and method"))
    return save_figure(fig, out_dir, stem or f"error_heatmap_step{step}")


def plot_spectra(
    exact: np.ndarray,
    approximations: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike,
    *,
    title: str = "",
    stem: str = "spectra",
) -> list[Path]:
    """The eigenvalues of F against those of each approximation F̂, on a log axis.

    Eigenvalues are sorted in descending (algebraic) order and drawn as ``|λ_i|`` against
    ``i``: positive ones as a solid line, negative ones (indefinite approximations) as hollow
    markers on a dotted line, so they stay visible on the log axis and are never mistaken for
    positive ones. Values within :data:`ROUNDOFF_EPS` machine epsilons of zero, relative to
    the array's largest, are round-off and left out.

    Args:
        exact: eigenvalues of the exact block F (its nonzero part, as analysis stores it).
        approximations: ``{method: eigenvalues of F̂}`` (the algebraically largest, those Error 2 uses).
        out_dir: where the figure goes.
        title: what was run and where (layer, step).
        stem: file name without suffix.
    """
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = fig.subplots()
    _draw_spectrum(ax, "fisher", np.asarray(exact), linewidth=3.0, alpha=0.45)
    any_negative = False
    for method in method_order(approximations):
        any_negative |= _draw_spectrum(ax, method, np.asarray(approximations[method]), linewidth=1.3, alpha=0.9)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index i (descending algebraic order)")
    ax.set_ylabel("|λ$_i$|")
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    note = Line2D([], [], color="0.3", linestyle=":", marker="o", markerfacecolor="none")
    handles.append(note)
    labels.append("λ < 0, drawn as |λ|" + ("" if any_negative else " (none here)"))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="solid lines: λ > 0")
    ax.set_title(
        f"eigenvalues of F and of each approximation; |λ| ≤ {ROUNDOFF_EPS} ε·max|λ| omitted as round-off", fontsize=9
    )
    fig.suptitle(title or "eigenvalues")
    return save_figure(fig, out_dir, stem)


def plot_kron_profiles(
    steps: Sequence[int],
    profiles: Sequence[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    title: str = "",
    stem: str = "kron_profile",
) -> list[Path]:
    """The Kronecker singular-value profile ``σ_k / σ_1`` of F over training, log y.

    ``σ_k`` are the singular values of the rearranged block Z(F): the Frobenius error of the
    best rank-r Kronecker approximation is ``sqrt(Σ_{k>r} σ_k²)``, so a fast decay means few
    Kronecker terms suffice. One line per recorded step, coloured by step. The k axis is
    logarithmic when the profiles are longer than 30; ratios within :data:`ROUNDOFF_EPS`
    machine epsilons of zero are round-off and left out.

    Args:
        steps: the recorded steps, one per profile.
        profiles: the singular values of Z(F) at each step, descending.
        out_dir: where the figure goes.
        title: what was run and for which layer.
        stem: file name without suffix.

    Raises:
        UserInputError: if ``steps`` and ``profiles`` differ in length or are empty.
    """
    if not steps or len(steps) != len(profiles):
        raise UserInputError(f"need one profile per step, got {len(steps)} steps and {len(profiles)} profiles")
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    lo, hi = min(steps), max(steps)
    colours = ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1), "viridis")  # one step still has a scale
    curves = []
    for step, sigma in sorted(zip(steps, profiles), key=lambda pair: pair[0]):
        sigma = np.asarray(sigma)
        top = float(sigma[0]) if sigma.size else 0.0
        ratio = sigma.astype(float) / top if top > 0 else np.zeros(0)  # a zero block has no profile
        keep = ratio > ROUNDOFF_EPS * _eps(sigma)
        curves.append((step, np.flatnonzero(keep) + 1, ratio[keep]))
    longest = max(int(k.max(initial=0)) for _, k, _ in curves)
    for step, k, ratio in curves:
        ax.plot(k, ratio, color=colours.to_rgba(step), marker="." if longest <= 30 else None, linewidth=1.2)
    ax.set_yscale("log")
    if longest > 30:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("k (index of the Kronecker singular value)")
    ax.set_ylabel("σ$_k$ / σ$_1$")
    ax.grid(True, which="major", alpha=0.3)
    fig.colorbar(colours, ax=ax, label="training step")
    ax.set_title("singular values of the rearranged block Z(F), one line per recorded step", fontsize=9)
    fig.suptitle(title or "Kronecker singular-value profile")
    return save_figure(fig, out_dir, stem)


def default_layer(layers: Sequence[int]) -> int:
    """The paper's layer 5 when it was analyzed, else the middle analyzed layer."""
    layers = sorted(layers)
    return PAPER_LAYER if PAPER_LAYER in layers else layers[(len(layers) - 1) // 2]


def resolve_view(results: Results, layer: int | None = None, step: int | None = None) -> tuple[int, int]:
    """The layer and step :func:`plot_run` draws: the defaults filled in, the choices checked.

    Raises:
        UserInputError: if ``layer`` or ``step`` was not analyzed.
    """
    layer = default_layer(results.layers) if layer is None else layer
    if layer not in results.layers:
        raise UserInputError(f"layer {layer} was not analyzed in {results.path} (layers: {_listing(results.layers)})")
    step = results.steps[-1] if step is None else step
    if step not in results.steps:
        raise UserInputError(f"step {step} was not analyzed in {results.path} (steps: {_listing(results.steps)})")
    return layer, step


def plot_run(
    results: Results, out_dir: str | os.PathLike, layer: int | None = None, step: int | None = None
) -> list[Path]:
    """Draw every figure of an analyzed run; returns the paths written (PNG and PDF).

    Args:
        results: :func:`fisherlab.analysis.load_results` of the run.
        out_dir: where the figures go.
        layer: the layer of the error, spectrum and profile figures (default:
            :func:`default_layer`).
        step: the step of the heatmap's top row and of the spectrum (default: the last one).

    Raises:
        UserInputError: if ``layer`` or ``step`` was not analyzed.
    """
    from fisherlab.analysis import EXACT  # results come from there: no extra import cost

    layer, step = resolve_view(results, layer, step)
    run = describe_run(results.config)
    paths = plot_errors(results.rows, layer, out_dir, title=run)
    paths += plot_error_heatmap(results.rows, out_dir, step=step, title=run)
    spectra = results.spectra(step, layer)
    exact = spectra.pop(EXACT, None)
    if exact is None:
        raise UserInputError(f"{results.path} lacks the exact spectrum of step {step}, layer {layer}; rerun analyze")
    paths += plot_spectra(
        exact, spectra, out_dir, title=_join(run, f"layer {layer}, step {step}"), stem=f"spectra_layer{layer}_step{step}"
    )
    profile_steps, profiles = results.profiles(layer)
    paths += plot_kron_profiles(
        profile_steps, profiles, out_dir, title=_join(run, f"layer {layer}"), stem=f"kron_profile_layer{layer}"
    )
    return paths


def _join(*parts: str) -> str:
    return " · ".join(p for p in parts if p)


def _listing(values: Sequence[int]) -> str:
    values = list(values)
    if len(values) <= 8:
        return ", ".join(map(str, values))
    return f"{', '.join(map(str, values[:3]))}, …, {', '.join(map(str, values[-2:]))} ({len(values)} in all)"


def _error(row: Mapping, key: str) -> float:
    """An error of a results row; NaN (a gap in a line, a blank cell) where it is undefined
    (status ``zero block``) or its fit failed."""
    value = row[key]
    return np.nan if value is None or value == "" else float(value)


def _eps(values: np.ndarray) -> float:
    """Machine epsilon of the precision ``values`` were computed in (float64 unless float32)."""
    return float(np.finfo(values.dtype if values.dtype == np.float32 else np.float64).eps)


def _markevery(n: int) -> int:
    # At most about 15 markers a line: enough to tell methods apart, few enough to see the line.
    return max(1, n // 15)


def _wide_range(values: Iterable[float]) -> bool:
    """Whether positive finite ``values`` span more than :data:`LOG_RANGE`."""
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    return values.size > 1 and values.max() > LOG_RANGE * values.min()


def _scale_y(ax, values: Sequence[float]) -> None:
    if _wide_range(values):
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    else:
        ax.set_ylim(bottom=0)


def _plain_log_labels(axis) -> None:
    """Label a log axis with plain numbers (0.05, not 5×10⁻²): errors read as fractions.

    Minor ticks at 2 and 5 (and 3 within a decade) get labels while the axis spans few
    decades, so a narrow range still shows more than one label.
    """

    def minor(value: float, _) -> str:
        lo, hi = sorted(axis.get_view_interval())
        span = hi / lo if lo > 0 else np.inf
        wanted = (2, 3, 5) if span < 10 else (2, 5) if span < 300 else ()
        return f"{value:g}" if round(value / 10 ** np.floor(np.log10(value))) in wanted else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _norm(values: np.ndarray) -> Normalize:
    """A colour scale for errors: logarithmic over a wide range, linear from 0 otherwise."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if _wide_range(positive):
        return LogNorm(positive.min(), positive.max())
    top = finite.max(initial=0.0)
    return Normalize(0.0, top if top > 0 else 1.0)


def _annotate(ax, grid: np.ndarray, image) -> None:
    """Write each cell's value, dark on light cells and light on dark ones."""
    for (i, j), value in np.ndenumerate(grid):
        if not np.isfinite(value):
            continue
        r, g, b, _ = image.cmap(image.norm(value))
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, f"{value:.2g}", ha="center", va="center", color=ink, fontsize=8)


def _draw_spectrum(ax, name: str, eigenvalues: np.ndarray, *, linewidth: float, alpha: float) -> bool:
    """Draw one spectrum as |λ| (see :func:`plot_spectra`); returns whether it has negative values."""
    lam = np.sort(eigenvalues.astype(float))[::-1]
    index = np.arange(1, lam.size + 1)
    floor = ROUNDOFF_EPS * _eps(eigenvalues) * np.abs(lam).max(initial=0.0)
    positive, negative = lam > floor, lam < -floor
    colour, mark = style.color(name), style.marker(name)
    ax.plot(
        index[positive], lam[positive], color=colour, marker=mark or None, markevery=_markevery(int(positive.sum())),
        markersize=4, linewidth=linewidth, alpha=alpha, label=style.label(name),
    )
    if negative.any():
        ax.plot(
            index[negative], -lam[negative], color=colour, linestyle=":", marker=mark or "o",
            markerfacecolor="none", markevery=_markevery(int(negative.sum())), markersize=5, linewidth=1.0,
        )
    return bool(negative.any())
