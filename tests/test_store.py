"""RunWriter / RunReader: round trip, refusals, resume, crash safety under SIGKILL, analysis groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime

import h5py
import numpy as np
import pytest
import torch

from fisherlab import store
from fisherlab.errors import StoreFormatError, UserInputError
from fisherlab.kron import BlockStats
from fisherlab.store import (
    COMPRESSION_NEEDS_PLUGIN,
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    FORMAT,
    FORMAT_VERSION,
    RunReader,
    RunWriter,
)

LAYERS = {1: (4, 3), 2: (3, 5)}
CONFIG = {"problem": "4-3-5", "optimizer": {"name": "adam", "lr": 1e-3}, "batch_size": 6, "layers": [1, 2]}


def _stats(step: int, layers=LAYERS, n: int = 6) -> dict[int, BlockStats]:
    """Deterministic float32 statistics of a step, so a round trip is exact."""
    gen = torch.Generator().manual_seed(step)
    out = {}
    for i, (d_in, d_out) in layers.items():
        a = torch.randn(n, d_in + 1, generator=gen)
        a[:, 0] = 1
        out[i] = BlockStats(a, torch.randn(n, d_out, generator=gen))
    return out


def _write(path, steps=(0, 5, 10), **kwargs) -> None:
    with RunWriter(path, CONFIG, LAYERS, **kwargs) as writer:
        for step in steps:
            writer.write_step(step, step // 5, 1.0 / (step + 1), _stats(step))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, CONFIG, LAYERS) as writer:
        assert writer.last_step is None
        for step in (0, 5, 10):
            # 4 p² is 900 bytes for layer 1 (p = 15) and 1,600 for layer 2 (p = 20).
            writer.write_step(step, step // 5, 1.0 / (step + 1), _stats(step), dense_budget=1000)
        assert writer.last_step == 10
    with RunReader(path) as reader:
        assert reader.config == CONFIG
        assert reader.layers == LAYERS
        assert reader.steps() == [0, 5, 10]
        assert reader.finished
        assert reader.attrs["format"] == FORMAT and reader.attrs["format_version"] == FORMAT_VERSION
        assert reader.attrs["torch_version"] == torch.__version__
        datetime.fromisoformat(reader.attrs["created"])
        assert reader.step_attrs(5) == {"step": 5, "epoch": 1, "loss": pytest.approx(1 / 6)}
        for step in reader.steps():
            expected = _stats(step)
            for layer in LAYERS:
                stats = reader.stats(step, layer)
                assert stats.a.dtype == torch.float64
                assert torch.equal(stats.a, expected[layer].a.double())
                assert torch.equal(stats.g, expected[layer].g.double())
            torch.testing.assert_close(reader.dense(step, 1), expected[1].to_dense().double())
            assert reader.dense(step, 2) is None
        assert reader.stats(0, 2, dtype=torch.float32).g.dtype == torch.float32
        blocks = [(step, layer) for step, layer, _ in reader.iter_blocks()]
        assert blocks == [(s, i) for s in (0, 5, 10) for i in (1, 2)]
        with pytest.raises(UserInputError, match="step 7"):
            reader.stats(7, 1)
        with pytest.raises(UserInputError, match="layer 3"):
            reader.stats(0, 3)
    with h5py.File(path) as f:  # the documented layout, read without fisherlab
        assert json.loads(f.attrs["config"]) == CONFIG
        assert dict(f["layers/layer2"].attrs) == {"index": 2, "d_in": 3, "d_out": 5}
        assert f["steps/00000010/layer2/a"].dtype == np.float32
        assert f["steps/00000010/layer2/g"].shape == (6, 5)
        assert f["steps/00000005/layer1/fisher"].shape == (15, 15)


def test_run_interrupted_by_an_exception_is_not_finished(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt), RunWriter(path, CONFIG, LAYERS) as writer:
        writer.write_step(0, 0, 1.0, _stats(0))
        raise KeyboardInterrupt
    with RunReader(path) as reader:
        assert reader.steps() == [0] and not reader.finished


def test_existing_file_needs_force_or_resume(tmp_path):
    path = tmp_path / "run.h5"
    _write(path)
    with pytest.raises(UserInputError, match="already exists") as excinfo:
        RunWriter(path, CONFIG, LAYERS)
    _one_line(excinfo)
    with pytest.raises(UserInputError, match="one of"):
        RunWriter(path, CONFIG, LAYERS, force=True, resume=True)
    _write(path, steps=(3,), force=True)
    with RunReader(path) as reader:
        assert reader.steps() == [3]


def test_resume(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, steps=(0, 5))
    with h5py.File(path, "r+") as f:  # the leftover of a step killed mid-write
        f.create_group("steps/00000010/layer1")
    with RunReader(path) as reader:
        assert reader.steps() == [0, 5]
    with RunWriter(path, CONFIG, LAYERS, resume=True) as writer:
        assert writer.last_step == 5
        with pytest.raises(ValueError, match="already recorded"):
            writer.write_step(5, 1, 0.5, _stats(5))
        writer.write_step(10, 2, 0.1, _stats(10))
    with RunReader(path) as reader:
        assert reader.steps() == [0, 5, 10] and reader.finished
        assert torch.equal(reader.stats(10, 2).g, _stats(10)[2].g.double())
    with pytest.raises(UserInputError, match="config differs in batch_size") as excinfo:
        RunWriter(path, {**CONFIG, "batch_size": 7}, LAYERS, resume=True)
    _one_line(excinfo)
    with pytest.raises(UserInputError, match="layers"):
        RunWriter(path, CONFIG, {1: (4, 3)}, resume=True)
    with RunWriter(tmp_path / "new.h5", CONFIG, LAYERS, resume=True) as writer:
        assert writer.last_step is None


def test_unwritable_paths(tmp_path):
    with pytest.raises(UserInputError, match="does not exist") as excinfo:
        RunWriter(tmp_path / "missing" / "run.h5", CONFIG, LAYERS)
    _one_line(excinfo)
    with pytest.raises(UserInputError, match="directory"):
        RunWriter(tmp_path, CONFIG, LAYERS, force=True)


def test_write_step_checks_its_statistics(tmp_path):
    with RunWriter(tmp_path / "run.h5", CONFIG, LAYERS) as writer:
        with pytest.raises(ValueError, match="layers"):
            writer.write_step(0, 0, 1.0, {1: _stats(0)[1]})
        with pytest.raises(ValueError, match="do not fit"):
            writer.write_step(0, 0, 1.0, _stats(0, {1: (4, 3), 2: (3, 4)}))
        with pytest.raises(ValueError, match="step"):
            writer.write_step(-1, 0, 1.0, _stats(0))


def _make_foreign(path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))


def _make_newer(path) -> None:
    _write(path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1


def _make_text(path) -> None:
    path.write_text("step,loss\n0,1.0\n")


def _make_truncated(path) -> None:
    _write(path, steps=range(0, 100, 5))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize(
    "make, message",
    [(_make_foreign, "not a fisherlab run file"), (_make_newer, "newer"), (_make_text, "not an HDF5"),
     (_make_truncated, "HDF5")],
    ids=["foreign", "newer", "text", "truncated"],
)
def test_reader_refuses_other_files(tmp_path, make, message):
    path = tmp_path / "file.h5"
    make(path)
    with pytest.raises(StoreFormatError, match=message) as excinfo:
        RunReader(path)
    _one_line(excinfo)
    with pytest.raises(StoreFormatError):
        RunWriter(path, CONFIG, LAYERS, resume=True)


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="no run file"):
        RunReader(tmp_path / "nothing.h5")


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_store import CONFIG, LAYERS, _stats
    from fisherlab.store import RunWriter

    path, progress = sys.argv[1], sys.argv[2]
    writer = RunWriter(path, CONFIG, LAYERS)
    for step in range(10**6):
        writer.write_step(step, 0, 1.0, _stats(step, n=200))
        with open(progress + ".tmp", "w") as f:
            f.write(str(step))
        os.replace(progress + ".tmp", progress)  # atomic: the parent never reads a partial number
        time.sleep(0.01)
    """
)


def test_killed_writer_keeps_every_completed_step(tmp_path):
    path, progress = tmp_path / "run.h5", tmp_path / "progress"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=os.path.dirname(__file__)))
    child = subprocess.Popen([sys.executable, str(script), str(path), str(progress)])
    try:
        deadline = time.monotonic() + 60
        while not (progress.exists() and int(progress.read_text()) >= 2):
            assert child.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    completed = int(progress.read_text())
    with RunReader(path) as reader:
        assert not reader.finished
        steps = reader.steps()
        assert steps == list(range(len(steps))) and len(steps) >= completed + 1
        for step, layer, stats in reader.iter_blocks():
            assert torch.equal(stats.a, _stats(step, n=200)[layer].a.double())
    with RunWriter(path, CONFIG, LAYERS, resume=True) as writer:
        assert writer.last_step == steps[-1]
        writer.write_step(steps[-1] + 1, 0, 1.0, _stats(0))
    with RunReader(path) as reader:
        assert reader.steps()[-1] == steps[-1] + 1 and reader.finished


def test_analysis_groups(tmp_path):
    path = tmp_path / "run.h5"
    _write(path)
    with RunReader(path) as reader, pytest.raises(RuntimeError, match="read-only"):
        reader.write_analysis(0, 1, "kfac", {}, {})
    with RunReader(path, mode="a") as reader:
        assert not reader.analysis_done(5, 2, "kfac")
        reader.write_analysis(
            5, 2, "kfac", {"eigenvalues": torch.arange(3.0), "skipped": None}, {"error1": 0.5, "iterations": None}
        )
        reader.write_analysis(0, 1, "kpsvd", {"eigenvalues": np.ones(2)}, {"error1": 0.1, "converged": True})
        reader.write_analysis(0, 1, "kpsvd", {"eigenvalues": np.zeros(2)}, {"error1": 0.2, "converged": False})
        with pytest.raises(UserInputError, match="step 7"):
            reader.write_analysis(7, 1, "kfac", {}, {})
        reader._file.create_group("analysis/00000010/layer1/lanczos")  # killed mid-write
    with RunReader(path) as reader:
        assert reader.analysis_done(5, 2, "kfac") and not reader.analysis_done(10, 1, "lanczos")
        assert reader.analysis_keys() == [(0, 1, "kpsvd"), (5, 2, "kfac")]
        arrays, attrs = reader.read_analysis(5, 2, "kfac")
        assert set(arrays) == {"eigenvalues"} and np.array_equal(arrays["eigenvalues"], [0.0, 1.0, 2.0])
        assert attrs == {"error1": 0.5, "iterations": None}
        arrays, attrs = reader.read_analysis(0, 1, "kpsvd")
        assert attrs == {"error1": 0.2, "converged": False} and np.array_equal(arrays["eigenvalues"], [0, 0])
        with pytest.raises(UserInputError, match="no lanczos result"):
            reader.read_analysis(10, 1, "lanczos")
        assert reader.steps() == [0, 5, 10]


# HDF5 filter ids in a dataset's pipeline, by compression name (32004 and 32015: hdf5plugin's).
_FILTER_IDS = {"lz4": [32004], "zstd": [32015], "gzip": [h5py.h5z.FILTER_DEFLATE], "lzf": [32000], "none": []}


def _filter_ids(dataset: h5py.Dataset) -> list[int]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_compressions_and_float64_statistics_round_trip_exactly(tmp_path, compression):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    a[:, 0] = 1
    stats = BlockStats(a, torch.randn(5, 3, generator=gen, dtype=torch.float64))
    path = tmp_path / "run.h5"
    with RunWriter(path, {"problem": "x"}, {1: (3, 3)}, compression=compression) as writer:
        writer.write_step(0, 0, 1.0, {1: stats})
    with RunReader(path) as reader:
        back = reader.stats(0, 1)
        assert torch.equal(back.a, stats.a) and torch.equal(back.g, stats.g)  # float64 kept
        assert torch.equal(reader.dense(0, 1), stats.to_dense())
    with h5py.File(path) as f:
        for name in ("a", "g", "fisher"):
            assert _filter_ids(f[f"steps/00000000/layer1/{name}"]) == _FILTER_IDS[compression]
    with pytest.raises(UserInputError, match="unknown compression"):
        RunWriter(tmp_path / "other.h5", {}, {1: (3, 3)}, compression="brotli")


@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip"])
def test_chunks_are_whole_rows_of_about_chunk_bytes(tmp_path, monkeypatch, compression):
    monkeypatch.setattr(store, "CHUNK_BYTES", 1000)
    layers = {1: (4, 3), 2: (300, 2)}  # rows of a: 20 bytes (50 a chunk), layer 2: 1,204 bytes (1)
    stats = _stats(0, layers, n=120)
    path = tmp_path / "run.h5"
    with RunWriter(path, CONFIG, layers, compression=compression) as writer:
        writer.write_step(0, 0, 1.0, stats)
    with h5py.File(path) as f:
        assert f["steps/00000000/layer1/a"].chunks == (50, 5)
        assert f["steps/00000000/layer1/g"].chunks == (83, 3)
        assert f["steps/00000000/layer2/a"].chunks == (1, 301)
    with RunReader(path) as reader:
        for layer in layers:
            assert torch.equal(reader.stats(0, layer).a, stats[layer].a.double())
            assert torch.equal(reader.stats(0, layer).g, stats[layer].g.double())


def test_default_compression_shrinks_relu_like_statistics(tmp_path):
    # About half the entries exactly zero, as after a ReLU: what the lossless codecs gain on.
    stats = _stats(0, n=2000)
    for block in stats.values():
        block.a[block.a < 0] = 0
        block.g[block.g < 0] = 0
    path = tmp_path / "run.h5"
    with RunWriter(path, CONFIG, LAYERS) as writer:
        writer.write_step(0, 0, 1.0, stats)
    with h5py.File(path) as f:
        datasets = [f[f"steps/00000000/layer{i}/{name}"] for i in LAYERS for name in ("a", "g")]
        raw = sum(ds.size * ds.dtype.itemsize for ds in datasets)
        stored = sum(ds.id.get_storage_size() for ds in datasets)
        assert all(_filter_ids(ds) == _FILTER_IDS[DEFAULT_COMPRESSION] for ds in datasets)
    assert stored < 0.8 * raw


def _write_old_gzip_file(path) -> None:
    """A run file as fisherlab's first versions wrote it: gzip 4, h5py's own chunks, no compression attribute."""
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {"format": FORMAT, "format_version": FORMAT_VERSION, "fisherlab_version": "0.1.0",
             "created": "2026-01-01T00:00:00+00:00", "config": json.dumps(CONFIG), "torch_version": "2.1.0",
             "finished": True}
        )
        for i, (d_in, d_out) in LAYERS.items():
            f.create_group(f"layers/layer{i}").attrs.update({"index": i, "d_in": d_in, "d_out": d_out})
        for step in (0, 5):
            group = f.create_group(f"steps/{step:08d}")
            group.attrs.update({"step": step, "epoch": 0, "loss": 0.5, "complete": True})
            for i, stats in _stats(step).items():
                for name, x in (("a", stats.a), ("g", stats.g)):
                    group.create_dataset(f"layer{i}/{name}", data=x.numpy(), chunks=True, compression="gzip",
                                         compression_opts=4)


def test_old_gzip_files_still_read_and_resume(tmp_path):
    path = tmp_path / "old.h5"
    _write_old_gzip_file(path)
    with RunReader(path) as reader:
        assert reader.steps() == [0, 5] and reader.finished
        for step, layer, stats in reader.iter_blocks():
            assert torch.equal(stats.a, _stats(step)[layer].a.double())
            assert torch.equal(stats.g, _stats(step)[layer].g.double())
    with RunWriter(path, CONFIG, LAYERS, resume=True) as writer:  # new steps in the default compression
        writer.write_step(10, 2, 0.1, _stats(10))
    with RunReader(path) as reader:
        assert reader.steps() == [0, 5, 10]
        assert torch.equal(reader.stats(10, 2).g, _stats(10)[2].g.double())
        assert torch.equal(reader.stats(0, 2).g, _stats(0)[2].g.double())


_PLAIN_READ = textwrap.dedent(
    """
    import sys
    import h5py  # no hdf5plugin, no fisherlab: a plain HDF5 reader
    with h5py.File(sys.argv[1]) as f:
        print(f["steps/00000000/layer2/g"][()].sum())
    assert "hdf5plugin" not in sys.modules
    """
)


def _plain_read(path) -> subprocess.CompletedProcess:
    """Read a dataset of ``path`` in a fresh interpreter that imports only h5py."""
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}
    return subprocess.run(
        [sys.executable, "-c", _PLAIN_READ, str(path)], capture_output=True, text=True, env=env, check=False
    )


def test_gzip_files_need_no_plugin(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, steps=(0,), compression="gzip")
    done = _plain_read(path)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(_stats(0)[2].g.sum()), rel=1e-5)


def test_default_compression_compresses_and_reads_with_plain_h5py(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, steps=(0,))  # the default compression, as `fisherlab record` writes
    with h5py.File(path) as f:
        assert f.attrs["compression"] == DEFAULT_COMPRESSION and not f.attrs["compression_needs_plugin"]
        assert _filter_ids(f["steps/00000000/layer2/g"]) == _FILTER_IDS[DEFAULT_COMPRESSION] != []
    done = _plain_read(path)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(_stats(0)[2].g.sum()), rel=1e-5)


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_compression_attributes_say_whether_plain_h5py_reads_the_file(tmp_path, compression):
    path = tmp_path / "run.h5"
    _write(path, steps=(0,), compression=compression)
    with RunReader(path) as reader:
        assert reader.attrs["compression"] == compression
        assert reader.attrs["compression_needs_plugin"] is COMPRESSION_NEEDS_PLUGIN[compression]
    done = _plain_read(path)
    assert (done.returncode == 0) is not COMPRESSION_NEEDS_PLUGIN[compression], done.stderr


def test_resume_with_another_compression_names_every_filter_in_the_file(tmp_path):
    path = tmp_path / "old.h5"
    _write_old_gzip_file(path)  # written before the attributes existed
    with RunWriter(path, CONFIG, LAYERS, resume=True, compression="lz4") as writer:
        writer.write_step(10, 2, 0.1, _stats(10))
    with RunReader(path) as reader:
        assert reader.attrs["compression"] == "gzip,lz4" and reader.attrs["compression_needs_plugin"] is True
        assert torch.equal(reader.stats(0, 1).a, _stats(0)[1].a.double())
        assert torch.equal(reader.stats(10, 1).a, _stats(10)[1].a.double())
    path = tmp_path / "new.h5"
    _write(path, steps=(0,), compression="gzip")
    with RunWriter(path, CONFIG, LAYERS, resume=True, compression="gzip") as writer:
        writer.write_step(5, 1, 0.1, _stats(5))
    with RunReader(path) as reader:
        assert reader.attrs["compression"] == "gzip" and reader.attrs["compression_needs_plugin"] is False
