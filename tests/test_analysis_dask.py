"""The analysis on a Dask cluster: the same results as the serial loop, bit for bit."""

import os
import shutil
import subprocess
import sys

import pytest

from fisherlab.analysis import analyze
from fisherlab.cli import main
from fisherlab.store import RunReader

from .test_analysis import run_file  # noqa: F401 - the fixture

distributed = pytest.importorskip("dask.distributed")

TIMINGS = ("seconds", "error_seconds")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, silence_logs=40,
        dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
    ) as local:
        yield local


def _copy(path, name):
    copy = path.with_name(name)
    shutil.copy(path, copy)
    return copy


def _contents(path) -> dict:
    """Every analysis result, arrays and attributes, less the timings."""
    with RunReader(path) as reader:
        out = {}
        for key in reader.analysis_keys():
            arrays, attrs = reader.read_analysis(*key)
            out[key] = ({k: v.tobytes() for k, v in arrays.items()}, {k: v for k, v in attrs.items() if k not in TIMINGS})
        return out


def test_distributed_results_equal_the_serial_ones_bit_for_bit(run_file, cluster, tmp_path):  # noqa: F811
    remote = _copy(run_file, "remote.h5")
    analyze(run_file, out_dir=tmp_path / "serial", progress=False)
    analyze(remote, out_dir=tmp_path / "remote", progress=False, scheduler=cluster.scheduler_address)
    serial = _contents(run_file)
    assert len(serial) == 3 * 2 * 7
    assert any(attrs.get("warm_started") for _, attrs in serial.values())  # warm starts were chained
    assert _contents(remote) == serial


def test_without_warm_starts_every_block_is_a_task_and_still_equal(run_file, cluster, tmp_path):  # noqa: F811
    remote = _copy(run_file, "remote.h5")
    analyze(run_file, out_dir=tmp_path / "serial", progress=False, warm_start=False, methods=["kpsvd", "lanczos"])
    analyze(remote, out_dir=tmp_path / "remote", progress=False, warm_start=False, methods=["kpsvd", "lanczos"],
            scheduler=cluster.scheduler_address)
    assert _contents(remote) == _contents(run_file)


def _install_killer(marker):
    """On a worker: the first fit anywhere on the cluster kills its process (once)."""
    import fisherlab.analysis as module

    real = module.fit

    def dying_fit(*args, **kwargs):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return real(*args, **kwargs)
        os._exit(1)

    module.fit = dying_fit
    module._real_fit = real


def _remove_killer():
    import fisherlab.analysis as module

    if hasattr(module, "_real_fit"):
        module.fit = module.__dict__.pop("_real_fit")


def test_a_killed_worker_loses_nothing(run_file, cluster, tmp_path):  # noqa: F811
    remote = _copy(run_file, "remote.h5")
    analyze(run_file, out_dir=tmp_path / "serial", progress=False)
    marker = tmp_path / "killed"
    with distributed.Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        client.run(_install_killer, str(marker))
        try:
            analyze(remote, out_dir=tmp_path / "remote", progress=False, scheduler=cluster.scheduler_address)
        finally:
            client.run(_remove_killer)
        client.wait_for_workers(2)
        assert marker.exists() and set(client.run(os.getpid).values()) != pids  # a worker did die
    assert _contents(remote) == _contents(run_file)  # its task was rerun: nothing lost, nothing failed


def test_cli_workers_and_a_second_analysis_is_refused(run_file, tmp_path, capsys):  # noqa: F811
    environ = dict(os.environ)
    assert main(["analyze", str(run_file), "--workers", "2", "--quiet", "--methods", "kfac,deflation"]) == 0
    assert dict(os.environ) == environ  # the workers' variables (OMP_NUM_THREADS=1...) do not leak
    rows = _contents(run_file)
    assert len(rows) == 3 * 2 * 3 and all(attrs["status"] == "ok" for _, attrs in rows.values())
    with RunReader(run_file, mode="a"):  # an analysis in progress holds the file open for writing
        second = subprocess.run(
            [sys.executable, "-m", "fisherlab.cli", "analyze", str(run_file), "--workers", "2", "--quiet"],
            capture_output=True, text=True, check=False, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
        )
    assert second.returncode == 2 and "open for writing by another process" in second.stderr
    assert second.stderr.count("\n") == 1
    assert _contents(run_file) == rows  # untouched


def test_bad_worker_counts_are_refused(run_file, capsys):  # noqa: F811
    assert main(["analyze", str(run_file), "--workers", "0"]) == 2
    assert "workers must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(run_file), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_an_unreachable_scheduler_is_one_line(run_file, monkeypatch, capsys):  # noqa: F811
    import fisherlab.analysis as analysis_module

    monkeypatch.setattr(analysis_module, "CONNECT_TIMEOUT_S", 1)
    assert main(["analyze", str(run_file), "--scheduler", "tcp://127.0.0.1:1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err


def test_dask_blocks_go_largest_first_within_each_step():
    from fisherlab.analysis import _largest_first
    from fisherlab.store import LayerSpec

    class Reader:
        layer_specs = {1: LayerSpec(30, 20), 2: LayerSpec(100, 50), 3: LayerSpec(5, 5, bias=False)}

    blocks = [(step, layer) for step in (0, 10) for layer in (1, 2, 3)]
    assert _largest_first(Reader(), blocks) == [(0, 2), (0, 1), (0, 3), (10, 2), (10, 1), (10, 3)]
