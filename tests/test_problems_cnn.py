"""The built-in networks mnist-cnn and mnist-cnn-ae, on a tiny random stand-in for MNIST and,
where it is installed, on MNIST itself."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from fisherlab.cli import main
from fisherlab.data import mnist
from fisherlab.errors import DataNotFoundError
from fisherlab.kron.shared import SharedBlock
from fisherlab.problems import TASKS, conv_autoencoder, get_task, lenet5
from fisherlab.record import record
from fisherlab.store import RunReader


def _write_idx(path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """120 random 28 × 28 images with labels: a 100/20 split."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (120, 28, 28)), rng.integers(0, 10, 120)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, images[:10])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, labels)
    return tmp_path, images, labels


def test_architectures():
    net = lenet5()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    kinds = [type(m).__name__ for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kinds == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net) == 2
    ae = conv_autoencoder()
    assert ae(torch.zeros(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    convs = [(type(m).__name__, m.in_channels, m.out_channels, m.kernel_size) for m in ae if hasattr(m, "kernel_size")]
    assert convs == [("Conv2d", 1, 6, (5, 5)), ("Conv2d", 6, 16, (5, 5)), ("ConvTranspose2d", 16, 6, (5, 5)),
                     ("ConvTranspose2d", 6, 1, (5, 5))]
    assert all(m.negative_slope == 0.2 for m in ae if isinstance(m, nn.LeakyReLU))
    assert set(TASKS) == {"mnist-cnn", "mnist-cnn-ae"} and get_task("MNIST-CNN") is TASKS["mnist-cnn"]
    assert get_task("mnist") is None


def test_labels_follow_the_images_split(tiny_mnist):
    folder, images, labels = tiny_mnist
    data = mnist.load_mnist(folder)
    train_labels, val_labels = mnist.load_mnist_labels(folder)
    assert len(train_labels) == data.train.shape[0] == 100 and len(val_labels) == 20
    rows = {tuple(row): label for row, label in zip(images.reshape(120, -1), labels, strict=True)}
    for x, label in zip((data.train * 255).round().numpy().astype(int), train_labels, strict=True):
        assert rows[tuple(x)] == label


def test_missing_labels_are_named(tiny_mnist):
    folder, _, _ = tiny_mnist
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="train-labels-idx1-ubyte"):
        mnist.load_mnist_labels(folder)


@pytest.mark.parametrize("name,likelihood,kinds", [
    ("mnist-cnn", "categorical", ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]),
    ("mnist-cnn-ae", "bernoulli", ["Conv2d", "Conv2d", "ConvTranspose2d", "ConvTranspose2d"]),
])
def test_record_builtin_networks_on_a_stand_in(tiny_mnist, tmp_path, name, likelihood, kinds):
    folder, _, _ = tiny_mnist
    task = TASKS[name](0, str(folder))
    assert task.likelihood == likelihood and task.train_inputs.shape == (100, 1, 28, 28)
    if name == "mnist-cnn":
        assert task.train_targets.dtype == torch.int64 and task.train_targets.shape == (100,)
    else:
        assert task.train_targets is task.train_inputs
    out = tmp_path / "run.h5"
    record(name, out, steps=2, every=1, batch_size=8, data_dir=folder, progress=False, dense_budget=0)
    with RunReader(out) as reader:
        assert reader.steps() == [0, 1]
        assert [s.kind for s in reader.layer_specs.values()] == kinds
        assert reader.config["problem"] == name and reader.config["likelihood"] == likelihood
        assert isinstance(reader.stats(1, 1), SharedBlock)


def test_cli_mnist_cnn_two_steps_on_real_mnist(tmp_path, capsys):
    try:
        mnist.load_mnist_labels()
    except DataNotFoundError:
        pytest.skip("MNIST with labels is not installed")
    out = tmp_path / "run.h5"
    assert main(["record", "--problem", "mnist-cnn", "--steps", "2", "--out", str(out), "--no-progress",
                 "--dense-budget", "0"]) == 0
    with RunReader(out) as reader:
        assert reader.steps() == [0] and reader.config["batch_size"] == 512
        assert reader.stats(0, 1).n_samples == 512
