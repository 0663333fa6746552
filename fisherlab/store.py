"""The HDF5 run file: per-step, per-layer Fisher statistics and the analysis results.

The only module that imports h5py. Layout (docs/design.md §5, ``format_version`` 2)::

    /                         attrs: format="fisherlab.run", format_version=2,
                                     fisherlab_version, created (ISO 8601), config (JSON),
                                     torch_version, finished (bool), compression (str),
                                     compression_needs_plugin (bool)
    /layers/layer<i>          attrs: index, d_in, d_out, and (version 2, where they differ
                                     from nn.Linear with a bias on 2-D inputs) kind, bias,
                                     positions, kernel, stride, padding, dilation, kfac_form
    /steps/<8-digit step>/    attrs: step, epoch, loss, complete
        layer<i>/             attrs (version 2): block = "stats" or "shared"
        layer<i>/a            float32 (N, d_in + bias), column 0 all ones with a bias
        layer<i>/g            float32 (N, d_out)
        layer<i>/p_samples    float32 (N, m, d_out), shared, dense storage (m = d_in + bias)
        layer<i>/act, grad    float32 (B, T, m), (N, T, d_out), shared, factored storage
        layer<i>/kfac_<form>_act, kfac_<form>_grad
                              float32 (m, m), (d_out, d_out), shared: KFAC's factors
        layer<i>/fisher       float32 (p, p), p = d_out m, column-major vec order of W
                              (A ⊗ G order), optional
    /analysis/<8-digit step>/layer<i>/<method>/
                              attrs: the method's scalars, complete; datasets: its arrays

A layer's statistics are a :class:`~fisherlab.kron.BlockStats` (one position per sample:
``a``, ``g``) or a :class:`~fisherlab.kron.shared.SharedBlock` (weight shared over ``T``
positions: its :meth:`~fisherlab.kron.shared.SharedBlock.state`). Version 1 files (the
paper's MLPs: only ``a``, ``g``, ``fisher`` and ``index, d_in, d_out``) read as version 2
files of ``nn.Linear`` layers with a bias; a resumed version 1 file keeps its version (its
steps are laid out as version 2 writes them).

Crash safety: a step (or analysis) group is built unlinked, marked ``complete``, flushed,
and only then linked under its name and flushed again, so a killed writer leaves every
group it finished readable; HDF5 has no atomic commit, so only a kill inside that second,
short flush (a few metadata blocks) can still damage the file (the kill test is in
benchmarks/results/run_file_compression.md). Readers ignore groups without ``complete``
and ``resume`` deletes them. ``finished`` is set only when the writer closes normally.
This survives a killed process, not a power cut (no fsync). The default ``libver`` is
deliberate: with ``libver="latest"`` HDF5 marks the file open-for-write in its superblock
and refuses to open it after a kill until ``h5clear`` is run on it.

Precision: the recorded datasets are float32 (the contract), except that statistics
recorded in float64 are kept in float64, so that no digit is lost where one was asked for.

Compression: the recorded datasets are compressed in chunks of whole rows (first index) of about
:data:`CHUNK_BYTES` (h5py's own chunk guess is a few kB for these shapes, which slows the
writes). ``compression`` picks the filter; every option reads back bit for bit:

- ``"lzf"`` (default) ships inside h5py, so ``h5py.File(path)[...]`` reads the file with
  no plugin; it is the fastest of the filters stock h5py reads. Other HDF5 tools (h5dump,
  HDFView) need h5py's lzf plugin.
- ``"gzip"`` (level 4) is built into every HDF5 library: choose it for files that plain
  HDF5 tools must read without plugins; it writes several times slower than lzf.
- ``"lz4"`` and ``"zstd"`` (level 1) are filters of the ``hdf5plugin`` package, which this
  module imports, so fisherlab reads and writes them with no setup; every other reader
  needs ``import hdf5plugin`` first (or ``HDF5_PLUGIN_PATH`` set to
  ``hdf5plugin.PLUGIN_PATH``). lz4 writes a little faster than lzf; zstd is as small as gzip.
- ``"none"``.

The root attributes ``compression`` (the filters of the recorded datasets, comma-separated
when a resumed run changed it) and ``compression_needs_plugin`` say what a reader needs;
files written before they existed (lz4 or gzip) read the same way. The measured trade-off
(seconds, MB per step, cost against an Adam step) is in
benchmarks/results/run_file_compression.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import hdf5plugin  # registers the Zstd and LZ4 filters with HDF5, for writing and reading
import numpy as np
import torch
from torch import Tensor

from fisherlab import __version__
from fisherlab.errors import StoreFormatError, UserInputError
from fisherlab.kron import BlockStats
from fisherlab.kron.shared import KFAC_FORMS, SharedBlock

FORMAT = "fisherlab.run"
FORMAT_VERSION = 2
#: Versions this code reads (and resumes).
READ_VERSIONS = (1, 2)

#: Largest dense block stored, in bytes of float32 (``4 p²``). 1 GiB admits layers 4 and 5
#: of MNIST and FACES (FACES layer 5: p = 15,500, 961 MB) and layers 4 to 9 of CURVES.
DEFAULT_DENSE_BUDGET = 2**30

#: HDF5 filters by compression name (module docstring: speed, size, portability).
COMPRESSIONS = {
    "lz4": dict(hdf5plugin.LZ4()),
    "zstd": dict(hdf5plugin.Zstd(clevel=1)),
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "lzf": {"compression": "lzf"},
    "none": {},
}
#: Whether reading a compression's datasets needs a filter plugin (``hdf5plugin``) that
#: stock HDF5 tools and a bare ``import h5py`` lack; gzip and lzf ship with h5py.
COMPRESSION_NEEDS_PLUGIN = {"lz4": True, "zstd": True, "gzip": False, "lzf": False, "none": False}
DEFAULT_COMPRESSION = "lzf"
_FILTER_NAMES = {
    hdf5plugin.LZ4_ID: "lz4",
    hdf5plugin.ZSTD_ID: "zstd",
    h5py.h5z.FILTER_DEFLATE: "gzip",
    h5py.h5z.FILTER_LZF: "lzf",
}
#: Bytes per chunk of a compressed dataset, in whole rows: h5py's own guess for an
#: (N, d) statistic, a few kB, makes the writes slower.
CHUNK_BYTES = 2**20
_ANALYSIS_FILTERS = {"chunks": True, **COMPRESSIONS["gzip"]}  # small arrays: any HDF5 tool reads them
_STEP_LIMIT = 10**8  # step names have 8 digits


def _step_name(step: int) -> str:
    return f"{step:08d}"


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_format(f: h5py.File, path: Path) -> None:
    """Refuse anything but a fisherlab run file of a version this code reads."""
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        raise StoreFormatError(f"{path} is not a fisherlab run file (format attribute {fmt!r}, expected {FORMAT!r})")
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)):
        raise StoreFormatError(f"{path} has no valid format_version attribute (got {version!r})")
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this fisherlab "
            f"{__version__} reads; upgrade fisherlab"
        )
    if version not in READ_VERSIONS:
        raise StoreFormatError(
            f"{path} has unsupported format_version {version} (this fisherlab reads "
            f"{', '.join(map(str, READ_VERSIONS))})"
        )
    if "config" not in f.attrs or "layers" not in f or "steps" not in f:
        raise StoreFormatError(f"{path} lacks the config, /layers or /steps of a run file")


@dataclass(frozen=True)
class LayerSpec:
    """What the run file says about a recorded layer (``/layers/layer<i>`` attributes).

    Attributes:
        d_in: columns of ``W`` without the bias's: input features, or the unfolded patch
            length of a convolution (``m = d_in + bias``).
        d_out: rows of ``W``: output features or channels.
        bias: whether column 0 of ``W`` is a bias.
        kind: the module type, e.g. ``"Linear"``, ``"Conv2d"``, ``"ConvTranspose2d"``.
        positions: ``T``, the positions per sample where ``W`` is applied (1: the block is a
            :class:`~fisherlab.kron.BlockStats`, otherwise a
            :class:`~fisherlab.kron.shared.SharedBlock`).
        kernel, stride, padding, dilation: a convolution's, empty for ``nn.Linear``.
        kfac_form: the recorded KFAC form of a shared layer (``"expand"`` or ``"reduce"``),
            empty where ``T = 1`` (both forms are then plain KFAC).
    """

    d_in: int
    d_out: int
    bias: bool = True
    kind: str = "Linear"
    positions: int = 1
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    kfac_form: str = ""

    @property
    def shared(self) -> bool:
        """Whether the weight is applied at more than one position (a SharedBlock)."""
        return self.positions > 1

    @property
    def d_act(self) -> int:
        """``m = d_in + bias``, the columns of ``W``."""
        return self.d_in + self.bias

    def attrs(self) -> dict:
        """The HDF5 attributes of this layer: ``d_in``, ``d_out`` and every other field that
        differs from its default (an ``nn.Linear`` with a bias on 2-D inputs has just those two,
        as in version 1)."""
        defaults = asdict(LayerSpec(0, 0))
        return {k: np.asarray(v, dtype=np.int64) if isinstance(v, tuple) else v
                for k, v in asdict(self).items() if k in ("d_in", "d_out") or v != defaults[k]}

    @classmethod
    def from_attrs(cls, attrs) -> LayerSpec:
        """The spec of a ``/layers/layer<i>`` group; version 1 groups are ``nn.Linear`` with a bias."""
        values = {}
        for key, default in asdict(cls(0, 0)).items():
            if key in attrs:
                raw = attrs[key]
                values[key] = tuple(int(x) for x in np.atleast_1d(raw)) if isinstance(default, tuple) else type(default)(
                    raw.item() if isinstance(raw, np.generic) else raw)
        return cls(**values)


def _spec(value: LayerSpec | tuple[int, int]) -> LayerSpec:
    return value if isinstance(value, LayerSpec) else LayerSpec(int(value[0]), int(value[1]))


def _read_specs(f: h5py.File) -> dict[int, LayerSpec]:
    specs = {int(group.attrs["index"]): LayerSpec.from_attrs(group.attrs) for group in f["layers"].values()}
    return dict(sorted(specs.items()))


def _read_layers(f: h5py.File) -> dict[int, tuple[int, int]]:
    return {i: (spec.d_in, spec.d_out) for i, spec in _read_specs(f).items()}


def _completed_steps(f: h5py.File) -> list[int]:
    return sorted(int(name) for name, group in f["steps"].items() if group.attrs.get("complete", False))


def _open_existing(path: Path, mode: str) -> h5py.File:
    """Open a run file and check its format; every failure is a one-line user error."""
    if not path.is_file():
        raise UserInputError(f"no run file at {path}")
    if not os.access(path, os.R_OK if mode == "r" else os.R_OK | os.W_OK):
        raise UserInputError(f"no permission to {'read' if mode == 'r' else 'write'} {path}")
    if not h5py.is_hdf5(path):
        raise StoreFormatError(f"{path} is not an HDF5 file (or is truncated)")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        if "unable to lock" in str(exc).lower():
            raise UserInputError(f"{path} is open for writing by another process") from exc
        raise StoreFormatError(f"{path} is not a readable HDF5 file ({_first_line(exc)})") from exc
    try:
        _check_format(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _compressions_in(steps: h5py.Group) -> set[str]:
    """Compression names of the recorded datasets, from their HDF5 filter pipelines."""
    names = set()

    def visit(_name: str, item) -> None:
        if isinstance(item, h5py.Dataset):
            plist = item.id.get_create_plist()
            ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
            names.update(_FILTER_NAMES.get(i, f"filter {i}") for i in ids if i != h5py.h5z.FILTER_SHUFFLE)
            names.update(() if ids else ("none",))

    steps.visititems(visit)
    return names


def _compression_attrs(names: set[str]) -> dict:
    """Root attributes that tell a reader which filters the recorded datasets need."""
    return {
        "compression": ",".join(sorted(names)),
        "compression_needs_plugin": any(COMPRESSION_NEEDS_PLUGIN.get(n, True) for n in names),
    }


def _write_group(f: h5py.File, path: str, fill) -> None:
    """Write a group with ``fill(group)`` and only then link it at ``path``.

    The group is built unlinked and flushed, so a kill before the link leaves only unused
    space; linking (replacing any earlier group at ``path``) then rewrites a few metadata
    blocks, flushed at once. ``complete`` is set before the link: readers require it.
    """
    group = h5py.Group(h5py.h5g.create(f.id, None))  # anonymous: reachable from nowhere yet
    fill(group)
    group.attrs["complete"] = True
    f.flush()
    parent_path, name = path.rsplit("/", 1)
    parent = f.require_group(parent_path)
    if name in parent:
        del parent[name]
    parent[name] = group
    f.flush()


class RunWriter:
    """Writes a run file step by step; use it as a context manager.

    Args:
        path: the run file (its directory must exist).
        config: the run's settings, stored as JSON (docs/design.md §5 lists the keys record writes).
        layers: ``{index: LayerSpec}`` of the recorded layers (1-based indices), or
            ``{index: (d_in, d_out)}`` for ``nn.Linear`` layers with a bias on 2-D inputs.
        force: overwrite an existing file.
        compression: a key of :data:`COMPRESSIONS`: ``"lzf"`` (default; read by h5py
            without plugins), ``"gzip"`` (read by every HDF5 tool without plugins),
            ``"lz4"`` or ``"zstd"`` (need ``hdf5plugin``), or ``"none"`` (see the module
            docstring).
        resume: continue an existing file (its config and layers must equal these); its
            incomplete steps are deleted and :attr:`last_step` tells where it stopped. A
            missing file is created.

    Raises:
        UserInputError: if the file exists and neither ``force`` nor ``resume`` is given, if
            both are, if the path cannot be written, or if a resumed file's config or
            layers differ.
        StoreFormatError: if a file to resume is not a readable run file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping,
        layers: Mapping[int, LayerSpec | tuple[int, int]],
        *,
        force: bool = False,
        resume: bool = False,
        compression: str = DEFAULT_COMPRESSION,
    ):
        if compression not in COMPRESSIONS:
            raise UserInputError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
        self._filters = COMPRESSIONS[compression]
        self.compression = compression
        if force and resume:
            raise UserInputError("choose one of force (overwrite) and resume (continue)")
        self.path = Path(path)
        self.layer_specs = {int(i): _spec(v) for i, v in sorted(layers.items())}
        self.layers = {i: (spec.d_in, spec.d_out) for i, spec in self.layer_specs.items()}
        if not self.layers or any(
            i < 1 or spec.d_act < 1 or spec.d_out < 1 or spec.positions < 1 for i, spec in self.layer_specs.items()
        ):
            raise ValueError(f"layers must map 1-based indices to positive (d_in, d_out), got {dict(layers)}")
        self._config_json = json.dumps(dict(config), sort_keys=True)
        self.last_step: int | None = None
        if resume and self.path.exists():
            self._file = _open_existing(self.path, "r+")
            self._resume()
        elif self.path.exists() and not force:
            raise UserInputError(f"run file {self.path} already exists; overwrite it (force) or continue it (resume)")
        else:
            self._file = self._create()

    def _create(self) -> h5py.File:
        parent = self.path.parent
        if not parent.is_dir():
            raise UserInputError(f"cannot create run file {self.path}: directory {parent} does not exist")
        if self.path.is_dir():
            raise UserInputError(f"cannot create run file {self.path}: it is a directory")
        try:
            f = h5py.File(self.path, "w")
        except OSError as exc:
            raise UserInputError(f"cannot create run file {self.path}: {_first_line(exc)}") from exc
        try:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "fisherlab_version": __version__,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "config": self._config_json,
                    "torch_version": str(torch.__version__),
                    "finished": False,
                    **_compression_attrs({self.compression}),
                }
            )
            for i, spec in self.layer_specs.items():
                group = f.create_group(f"layers/layer{i}")
                group.attrs.update({"index": i, **spec.attrs()})
            f.create_group("steps")
            f.flush()
        except BaseException:
            f.close()
            self.path.unlink()
            raise
        return f

    def _resume(self) -> None:
        f = self._file
        try:
            stored = json.loads(f.attrs["config"])
            wanted = json.loads(self._config_json)
            if stored != wanted:
                keys = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
                raise UserInputError(f"cannot resume {self.path}: its config differs in {', '.join(keys)}")
            if _read_specs(f) != self.layer_specs:
                raise UserInputError(f"cannot resume {self.path}: it records layers {_read_specs(f)}")
            for name, group in list(f["steps"].items()):
                if not group.attrs.get("complete", False):
                    del f["steps"][name]
            steps = _completed_steps(f)
            self.last_step = steps[-1] if steps else None
            f.attrs.update({"finished": False, **_compression_attrs(_compressions_in(f["steps"]) | {self.compression})})
            f.flush()
        except BaseException:
            f.close()
            raise

    def write_step(
        self,
        step: int,
        epoch: int,
        loss: float,
        stats_by_layer: Mapping[int, BlockStats | SharedBlock],
        dense_budget: int = DEFAULT_DENSE_BUDGET,
    ) -> None:
        """Store one step's statistics of every layer; returns once the step is on disk.

        Args:
            step: the optimizer step (0 … 10⁸ - 1), not yet recorded in this file.
            epoch: the epoch the step belongs to.
            loss: the training loss of the step's batch.
            stats_by_layer: ``{index: block}`` for exactly the file's layers, as
                :meth:`fisherlab.capture.BlockCapture.capture` returns them: a BlockStats for
                a layer of one position, a SharedBlock for a shared one.
            dense_budget: bytes allowed per dense block (``4 p²``); blocks within it are
                also stored densely (formed in the statistics' dtype and device). 0 stores none.

        Raises:
            ValueError: for a step out of range or already recorded, or statistics whose
                layers or shapes do not match the file's.
        """
        if not isinstance(step, (int, np.integer)) or not 0 <= step < _STEP_LIMIT:
            raise ValueError(f"step must be an integer in [0, {_STEP_LIMIT}), got {step!r}")
        if set(stats_by_layer) != set(self.layers):
            raise ValueError(f"statistics for layers {sorted(stats_by_layer)}, the file records {list(self.layers)}")
        for i, spec in self.layer_specs.items():
            _check_block(i, spec, stats_by_layer[i])
        name = _step_name(int(step))
        steps = self._file["steps"]
        if name in steps and steps[name].attrs.get("complete", False):
            raise ValueError(f"step {step} is already recorded in {self.path}")

        def fill(group: h5py.Group) -> None:
            group.attrs.update({"step": int(step), "epoch": epoch, "loss": float(loss)})
            for i in self.layers:
                stats = stats_by_layer[i]
                layer = group.create_group(f"layer{i}")
                if isinstance(stats, SharedBlock):
                    layer.attrs["block"] = "shared"
                    for key, value in stats.state().items():
                        if isinstance(value, Tensor):
                            self._dataset(layer, key, _stored(value))
                        else:
                            layer.attrs[key] = value
                else:
                    layer.attrs["block"] = "stats"
                    self._dataset(layer, "a", _stored(stats.a))
                    self._dataset(layer, "g", _stored(stats.g))
                if 4 * stats.p**2 <= dense_budget:
                    self._dataset(layer, "fisher", _stored(stats.to_dense(max_entries=stats.p**2)))

        _write_group(self._file, f"steps/{name}", fill)
        self.last_step = int(step) if self.last_step is None else max(self.last_step, int(step))

    def _dataset(self, group: h5py.Group, name: str, data: np.ndarray) -> None:
        """A dataset, compressed in chunks of whole rows (first index) of about :data:`CHUNK_BYTES`."""
        if not self._filters:
            group.create_dataset(name, data=data)
            return
        row_bytes = data.itemsize * int(np.prod(data.shape[1:]))
        rows = max(1, min(data.shape[0], CHUNK_BYTES // max(1, row_bytes)))
        group.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), **self._filters)

    def close(self, finished: bool = False) -> None:
        """Close the file; ``finished=True`` marks the run as having ended normally."""
        if self._file.id.valid:
            if finished:
                self._file.attrs["finished"] = True
            self._file.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)


def _check_block(index: int, spec: LayerSpec, block) -> None:
    """Refuse statistics that are not of the kind and shape the file records for a layer."""
    m, n = spec.d_act, spec.d_out
    if spec.shared:
        if not isinstance(block, SharedBlock) or (block.d_act, block.d_grad) != (m, n):
            got = type(block).__name__ if not isinstance(block, SharedBlock) else f"m = {block.d_act}, n = {block.d_grad}"
            raise ValueError(f"layer {index}: the file records a shared block with m = {m}, n = {n}, got {got}")
        if block.positions != spec.positions:
            raise ValueError(f"layer {index}: the file records {spec.positions} positions, the block has {block.positions}")
        return
    if not isinstance(block, BlockStats) or block.a.shape[1] != m or block.g.shape[1] != n:
        shapes = (f"a {tuple(block.a.shape)} and g {tuple(block.g.shape)}" if isinstance(block, BlockStats)
                  else type(block).__name__)
        raise ValueError(f"layer {index}: {shapes} do not fit (N, {m}) and (N, {n})")


def _stored(x: Tensor) -> np.ndarray:
    """float32 (the contract), or float64 for statistics that are float64."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().to(device="cpu", dtype=dtype).numpy()


class RunReader:
    """Reads a run file and, in mode ``"a"``, writes analysis results into it.

    Args:
        path: the run file.
        mode: ``"r"`` to read; ``"a"`` to also call :meth:`write_analysis` (the recorded
            steps are never modified).

    Raises:
        UserInputError: if the file is missing, unreadable, or locked by a writer.
        StoreFormatError: if it is not HDF5, truncated, not a fisherlab run file, or of
            another ``format_version``.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self._file = _open_existing(self.path, "r" if mode == "r" else "r+")
        try:
            self.config: dict = json.loads(self._file.attrs["config"])
            self.layer_specs: dict[int, LayerSpec] = _read_specs(self._file)
            self.layers: dict[int, tuple[int, int]] = _read_layers(self._file)
        except (KeyError, ValueError) as exc:
            self._file.close()
            raise StoreFormatError(f"{self.path} has a damaged header ({_first_line(exc)})") from exc
        self.attrs: dict = {k: _py(v) for k, v in self._file.attrs.items() if k != "config"}

    @property
    def finished(self) -> bool:
        """Whether the writer closed normally (False for a killed or still running record)."""
        return bool(self._file.attrs.get("finished", False))

    def steps(self) -> list[int]:
        """The completed steps, ascending."""
        return _completed_steps(self._file)

    def _step_group(self, step: int) -> h5py.Group:
        group = self._file["steps"].get(_step_name(step)) if 0 <= step < _STEP_LIMIT else None
        if group is None or not group.attrs.get("complete", False):
            raise UserInputError(f"step {step} is not recorded in {self.path} (steps: {_summary(self.steps())})")
        return group

    def _layer_group(self, step: int, layer: int) -> h5py.Group:
        if layer not in self.layers:
            raise UserInputError(f"layer {layer} is not recorded in {self.path} (layers: {list(self.layers)})")
        return self._step_group(step)[f"layer{layer}"]

    def step_attrs(self, step: int) -> dict:
        """``{"step", "epoch", "loss"}`` of a completed step."""
        attrs = self._step_group(step).attrs
        return {k: _py(attrs[k]) for k in ("step", "epoch", "loss")}

    def stats(
        self, step: int, layer: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> BlockStats | SharedBlock:
        """The statistics of one step and layer: ``BlockStats(a, g)``, or the SharedBlock of a
        shared-weight layer."""
        group = self._layer_group(step, layer)
        if group.attrs.get("block") == "shared":
            state = {k: _tensor(ds, dtype, device) for k, ds in group.items() if k != "fisher"}
            state.update({k: _py(group.attrs[k]) for k in ("kfac_form", "positions")})
            try:
                return SharedBlock.from_state(state)
            except ValueError as exc:
                raise StoreFormatError(f"{self.path}: step {step}, layer {layer} is damaged ({exc})") from exc
        return BlockStats(_tensor(group["a"], dtype, device), _tensor(group["g"], dtype, device))

    def kfac_forms(self, step: int, layer: int) -> list[str]:
        """The KFAC forms whose factors a shared block stores (reads no array); [] for a BlockStats."""
        group = self._layer_group(step, layer)
        return [form for form in KFAC_FORMS if f"kfac_{form}_act" in group]

    def dense(
        self, step: int, layer: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor | None:
        """The stored dense block (column-major vec order of ``W``, ``A ⊗ G`` order), or None
        where it was over the budget."""
        group = self._layer_group(step, layer)
        return _tensor(group["fisher"], dtype, device) if "fisher" in group else None

    def iter_blocks(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[int, int, BlockStats | SharedBlock]]:
        """``(step, layer, block)`` for every completed step and layer, in order."""
        for step in self.steps():
            for layer in self.layers:
                yield step, layer, self.stats(step, layer, dtype, device)

    # -- analysis results ---------------------------------------------------------------
    def write_analysis(
        self, step: int, layer: int, method: str, arrays: Mapping[str, Tensor | np.ndarray], attrs: Mapping
    ) -> None:
        """Store one method's result for a step and layer, replacing any earlier one.

        Args:
            step: a completed step.
            layer: a recorded layer.
            method: the method's name (no ``/``).
            arrays: named arrays (tensors are moved to the CPU), stored compressed; None
                values are left out.
            attrs: named scalars, strings or None (read back as None).
        """
        if self._file.mode != "r+":
            raise RuntimeError(f"{self.path} was opened read-only; open it with mode='a'")
        self._layer_group(step, layer)  # validates step and layer
        if not method or "/" in method:
            raise ValueError(f"invalid method name {method!r}")

        def fill(group: h5py.Group) -> None:
            group.attrs.update({k: h5py.Empty("f8") if v is None else v for k, v in attrs.items()})
            for key, value in arrays.items():
                if value is None:
                    continue
                data = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
                group.create_dataset(key, data=data, **(_ANALYSIS_FILTERS if data.ndim else {}))

        _write_group(self._file, f"analysis/{_step_name(step)}/layer{layer}/{method}", fill)

    def _analysis_group(self, step: int, layer: int, method: str) -> h5py.Group | None:
        group = self._file.get(f"analysis/{_step_name(step)}/layer{layer}/{method}")
        return group if group is not None and group.attrs.get("complete", False) else None

    def analysis_done(self, step: int, layer: int, method: str) -> bool:
        """Whether a complete result of ``method`` exists for this step and layer."""
        return self._analysis_group(step, layer, method) is not None

    def analysis_attrs(self, step: int, layer: int, method: str) -> dict | None:
        """The scalars of a complete result (as :meth:`read_analysis`), or None; reads no array."""
        group = self._analysis_group(step, layer, method)
        return None if group is None else {k: _py(v) for k, v in group.attrs.items() if k != "complete"}

    def read_analysis(self, step: int, layer: int, method: str) -> tuple[dict[str, np.ndarray], dict]:
        """``(arrays, attrs)`` as written by :meth:`write_analysis`.

        Raises:
            UserInputError: if no complete result exists.
        """
        group = self._analysis_group(step, layer, method)
        if group is None:
            raise UserInputError(f"no {method} result for step {step}, layer {layer} in {self.path}")
        attrs = {k: _py(v) for k, v in group.attrs.items() if k != "complete"}
        return {k: ds[()] for k, ds in group.items()}, attrs

    def analysis_keys(self) -> list[tuple[int, int, str]]:
        """``(step, layer, method)`` of every complete analysis result, sorted."""
        keys = []
        for step_name, step_group in self._file.get("analysis", {}).items():
            for layer_name, layer_group in step_group.items():
                for method, group in layer_group.items():
                    if group.attrs.get("complete", False):
                        keys.append((int(step_name), int(layer_name.removeprefix("layer")), method))
        return sorted(keys)

    def close(self) -> None:
        """Close the run file."""
        self._file.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _tensor(dataset: h5py.Dataset, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    return torch.from_numpy(dataset[()]).to(device=device, dtype=dtype)


def _py(value):
    """An HDF5 attribute as a plain Python value (an empty attribute is None)."""
    if isinstance(value, h5py.Empty):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _summary(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps)) or "none"
    return f"{', '.join(map(str, steps[:3]))}, …, {', '.join(map(str, steps[-2:]))} ({len(steps)} in all)"
