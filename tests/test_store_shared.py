"""Run file format version 2: shared-weight blocks, layer attributes, version 1 files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fisherlab.errors import StoreFormatError
from fisherlab.kron import BlockStats
from fisherlab.kron.shared import SharedBlock
from fisherlab.store import FORMAT_VERSION, LayerSpec, RunReader, RunWriter

V1_FILE = Path(__file__).parent / "data" / "run_v1.h5"
CONV = LayerSpec(d_in=12, d_out=4, bias=True, kind="Conv2d", positions=9, kernel=(2, 2), stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), kfac_form="expand")
SEQ = LayerSpec(d_in=6, d_out=7, bias=False, kind="Linear", positions=2, kfac_form="reduce")
PLAIN = LayerSpec(d_in=5, d_out=3, bias=False)
SPECS = {1: CONV, 2: SEQ, 3: PLAIN}


def _blocks(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    conv = SharedBlock(torch.randn(5, 9, 12, generator=gen), torch.randn(10, 9, 4, generator=gen), bias=True,
                       kfac="expand", kfac_forms=("expand", "reduce"))
    seq = SharedBlock(torch.randn(5, 2, 6, generator=gen), torch.randn(5, 2, 7, generator=gen), kfac="reduce")
    plain = BlockStats(torch.randn(5, 5, generator=gen), torch.randn(5, 3, generator=gen))
    return {1: conv, 2: seq, 3: plain}


def test_shared_blocks_round_trip_exactly(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, {"problem": "x"}, SPECS) as writer:
        writer.write_step(0, 0, 1.0, _blocks(0), dense_budget=2**20)
        writer.write_step(3, 0, 0.5, _blocks(3), dense_budget=0)
    expected = _blocks(0)
    assert expected[1].storage == "dense" and expected[2].storage == "factored"
    with RunReader(path) as reader:
        assert reader.attrs["format_version"] == FORMAT_VERSION == 2
        assert reader.layer_specs == SPECS
        assert reader.layers == {1: (12, 4), 2: (6, 7), 3: (5, 3)}
        for layer in (1, 2):
            block = reader.stats(0, layer, dtype=torch.float32)
            assert isinstance(block, SharedBlock)
            assert block.kfac_form == expected[layer].kfac_form and block.positions == expected[layer].positions
            want, got = expected[layer].state(), block.state()
            assert want.keys() == got.keys()
            for key, value in want.items():
                assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
        conv = reader.stats(0, 1)
        assert conv.dtype == torch.float64
        assert torch.equal(conv.kfac_factors("reduce")[0], expected[1].kfac_factors("reduce")[0].double())
        plain = reader.stats(0, 3, dtype=torch.float32)
        assert isinstance(plain, BlockStats)
        assert torch.equal(plain.a, expected[3].a) and torch.equal(plain.g, expected[3].g)
        for layer, block in expected.items():
            dense = reader.dense(0, layer)
            torch.testing.assert_close(dense, block.to(torch.float64).to_dense(), rtol=1e-5, atol=1e-5)
            assert reader.dense(3, layer) is None
    with h5py.File(path) as f:  # the documented layout, read without fisherlab
        attrs = f["layers/layer1"].attrs
        assert attrs["kind"] == "Conv2d" and attrs["positions"] == 9 and list(attrs["kernel"]) == [2, 2]
        assert dict(f["layers/layer3"].attrs) == {"index": 3, "d_in": 5, "d_out": 3, "bias": False}
        assert f["steps/00000000/layer1"].attrs["block"] == "shared"
        assert f["steps/00000000/layer1/p_samples"].shape == (10, 13, 4)
        assert f["steps/00000000/layer2/act"].shape == (5, 2, 6)
        assert f["steps/00000000/layer3"].attrs["block"] == "stats"


def test_dense_block_is_in_the_column_major_vec_order_of_w(tmp_path):
    """F = (1/N) Σ vec(∇W_n) vec(∇W_n)ᵀ with ∇W_n = Σ_t g_{n,t} ā_{n,t}ᵀ, column-major vec."""
    gen = torch.Generator().manual_seed(1)
    act, grad = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64), torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    block = SharedBlock(act, grad, bias=True)
    spec = LayerSpec(d_in=2, d_out=5, positions=3, kind="Conv1d", kfac_form="expand")
    with RunWriter(tmp_path / "run.h5", {}, {1: spec}) as writer:
        writer.write_step(0, 0, 0.0, {1: block})
    grads = [sum(torch.outer(grad[n, t], torch.cat([torch.ones(1, dtype=torch.float64), act[n, t]])) for t in range(3))
             for n in range(4)]
    vecs = torch.stack([w.T.reshape(-1) for w in grads])  # column-major vec of (d_out × m) matrices
    with RunReader(tmp_path / "run.h5") as reader:
        torch.testing.assert_close(reader.dense(0, 1), vecs.T @ vecs / 4)


def test_statistics_of_the_wrong_kind_are_refused(tmp_path):
    blocks = _blocks(0)
    with RunWriter(tmp_path / "run.h5", {}, SPECS) as writer:
        with pytest.raises(ValueError, match="layer 1: the file records a shared block"):
            writer.write_step(0, 0, 1.0, {**blocks, 1: blocks[3]})
        with pytest.raises(ValueError, match="layer 3"):
            writer.write_step(0, 0, 1.0, {**blocks, 3: blocks[2]})
        with pytest.raises(ValueError, match="positions"):
            writer.write_step(0, 0, 1.0, {**blocks, 2: SharedBlock(torch.randn(5, 3, 6), torch.randn(5, 3, 7))})
        assert writer.last_step is None


def test_resume_needs_the_same_layer_specs(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, {}, SPECS) as writer:
        writer.write_step(0, 0, 1.0, _blocks(0))
    with pytest.raises(Exception, match="records layers"):
        RunWriter(path, {}, {**SPECS, 1: LayerSpec(**{**CONV.__dict__, "kfac_form": "reduce"})}, resume=True)
    with RunWriter(path, {}, SPECS, resume=True) as writer:
        assert writer.last_step == 0


def test_version_1_file_reads_as_linear_layers_with_a_bias():
    """tests/data/run_v1.h5 was written by the format-1 code (record('8-4-8', steps=3, every=1,
    batch_size=16, compression='gzip')) before format 2 existed."""
    with RunReader(V1_FILE) as reader:
        assert reader.attrs["format_version"] == 1
        assert reader.steps() == [0, 1, 2]
        assert reader.layers == {1: (8, 4), 2: (4, 8)}
        assert reader.layer_specs == {1: LayerSpec(8, 4), 2: LayerSpec(4, 8)}
        stats = reader.stats(1, 2)
        assert isinstance(stats, BlockStats) and stats.a.shape == (16, 5) and stats.g.shape == (16, 8)
        assert torch.all(stats.a[:, 0] == 1)
        torch.testing.assert_close(reader.dense(1, 2), stats.to_dense(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("version", [0, 3])
def test_unknown_versions_are_refused(tmp_path, version):
    path = tmp_path / "run.h5"
    with RunWriter(path, {}, {1: (2, 2)}):
        pass
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = np.int64(version)
    with pytest.raises(StoreFormatError, match=f"format_version {version}") as excinfo:
        RunReader(path)
    assert "\n" not in str(excinfo.value)
