"""FACES: 25×25 faces, from ``newfaces_rot_single.mat`` or regenerated from Olivetti.

The original file (variable ``newfaces_single``, 625 × 165,600, each column a
column-major 25×25 image) is used when it is in the data directory. Otherwise the set
is regenerated from the 400 Olivetti faces (docs/data.md §4; Hinton & Salakhutdinov
2006): every original gives one image per (angle, scale) of a grid, by magnifying by
``s``, rotating about the centre by ``θ`` (counter-clockwise as displayed), cropping the
central ``crop × crop`` window and sampling it on a ``size × size`` grid of pixel centres
with bilinear interpolation, after a Gaussian low-pass filter of standard deviation
``(step − 1) / 2`` original pixels, where ``step = crop / (size s)`` is the sampling step
(scikit-image's anti-aliasing rule); positions are clamped to the image border. Rows are
ordered person, image, angle, scale (person-major, as the original). Then the per-pixel
mean over the whole set is subtracted and everything is divided by one scalar so that
the mean per-pixel variance is 1.

Split (both sources): persons 1–25 (the first 25/40 of the rows) form the pool, split at
random (seed 0) 80/20 into training and validation; persons 31–40 (the last 10/40) are
the test set. The grid and the geometry are inferred, not published: FACES regenerated
here is not the published file, and ``meta`` says so.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from scipy import ndimage

from fisherlab.data.base import (
    SPLIT_SEED,
    Dataset,
    cached,
    random_split,
    resolve_cache_dir,
    resolve_data_dir,
    settings,
    to_tensor,
)
from fisherlab.errors import DataNotFoundError, UserInputError

ORIGINAL_FILE = "newfaces_rot_single.mat"
OLIVETTI_FILE = "olivettifaces.mat"
OLIVETTI_ENV = "FISHERLAB_OLIVETTI"
GENERATOR_VERSION = 1
N_PERSONS = 40
TRAIN_PERSONS = 25  # persons 1-25
TEST_PERSONS = 10  # persons 31-40


@dataclass(frozen=True)
class FacesParams:
    """Every free parameter of the FACES regeneration (defaults: the grid of docs/data.md §4).

    Attributes:
        angles: Rotation angles in degrees, counter-clockwise (46 values, −90 to 90).
        scales: Magnifications (9 values, 1.40 to 1.80).
        crop: Side of the central window cut from the magnified, rotated image.
        size: Side of the output images.
    """

    angles: tuple[float, ...] = tuple(float(a) for a in range(-90, 91, 4))
    scales: tuple[float, ...] = tuple(round(1.40 + 0.05 * k, 2) for k in range(9))
    crop: int = 64
    size: int = 25

    def lowpass_sigma(self, scale: float) -> float:
        """Standard deviation, in original pixels, of the filter applied before sampling."""
        return max(0.0, 0.5 * (self.crop / (self.size * scale) - 1.0))


def _sampling_matrix(shape: tuple[int, int], angles: tuple[float, ...], scale: float, params: FacesParams):
    """Sparse bilinear-interpolation matrix, rows ``(angle, output pixel)``, columns source pixels."""
    height, width = shape
    offsets = (np.arange(params.size) + 0.5) * params.crop / params.size - params.crop / 2
    dr, dc = np.meshgrid(offsets, offsets, indexing="ij")
    theta = np.deg2rad(np.asarray(angles))[:, None, None]
    # Inverse map: rotate the output offset back by -θ and shrink by the magnification.
    rows = (dr * np.cos(theta) + dc * np.sin(theta)) / scale + (height - 1) / 2
    cols = (-dr * np.sin(theta) + dc * np.cos(theta)) / scale + (width - 1) / 2
    rows, cols = np.clip(rows.ravel(), 0, height - 1), np.clip(cols.ravel(), 0, width - 1)
    r0 = np.minimum(np.floor(rows).astype(np.int64), height - 2)
    c0 = np.minimum(np.floor(cols).astype(np.int64), width - 2)
    fr, fc = rows - r0, cols - c0
    out = np.arange(rows.size)
    entries = [(0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)]
    data = np.concatenate([w for _, _, w in entries])
    src = np.concatenate([(r0 + a) * width + (c0 + b) for a, b, _ in entries])
    return scipy.sparse.csr_matrix((data, (np.tile(out, 4), src)), shape=(rows.size, height * width))


def render_faces(images: np.ndarray, params: FacesParams = FacesParams()) -> np.ndarray:
    """Rotated, magnified, cropped and subsampled copies of each image (not normalised).

    Args:
        images: Upright grey-level images, ``(k, H, W)``.
        params: Grid and geometry.

    Returns:
        float32 ``(k, n_angles, n_scales, size * size)``, images row-major.
    """
    k, height, width = images.shape
    out = np.empty((k, len(params.angles), len(params.scales), params.size**2), dtype=np.float32)
    for j, scale in enumerate(params.scales):
        sigma = params.lowpass_sigma(scale)
        filtered = ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma), mode="nearest")
        sampled = _sampling_matrix((height, width), params.angles, scale, params) @ filtered.reshape(k, -1).T
        out[:, :, j, :] = sampled.reshape(len(params.angles), params.size**2, k).transpose(2, 0, 1)
    return out


def normalize(data: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, float]:
    """Subtract the per-pixel mean in place, then divide by the global scalar that makes
    the mean per-pixel variance 1.

    Args:
        data: float32 ``(n, d)``, modified in place.
        chunk: Rows per step, to bound the float64 temporaries.

    Returns:
        ``(per-pixel mean, scale)``.
    """
    mean = np.zeros(data.shape[1])
    for start in range(0, len(data), chunk):
        mean += data[start : start + chunk].sum(axis=0, dtype=np.float64)
    mean /= len(data)
    square = 0.0
    for start in range(0, len(data), chunk):
        block = data[start : start + chunk]
        block -= mean.astype(np.float32)
        square += np.square(block, dtype=np.float64).sum()
    scale = float(np.sqrt(square / data.size))
    data /= np.float32(scale)
    return mean, scale


def regenerate_faces(olivetti: np.ndarray, params: FacesParams = FacesParams()) -> tuple[np.ndarray, dict]:
    """The FACES set from the upright Olivetti images, person-major, normalised.

    Args:
        olivetti: ``(400, 64, 64)`` (any ``(k, H, W)`` works), in person order.
        params: Grid and geometry.

    Returns:
        ``(data, notes)``: float32 ``(k * n_angles * n_scales, size * size)`` and the
        normalisation and timing.
    """
    start = time.perf_counter()
    data = render_faces(olivetti, params).reshape(-1, params.size**2)
    _, scale = normalize(data)
    notes = {"normalization_scale": scale, "seconds": round(time.perf_counter() - start, 3)}
    return data, notes


def olivetti_from_columns(columns: np.ndarray) -> np.ndarray:
    """Upright ``(k, 64, 64)`` images from ``(k, 4096)`` rows of column-major pixels."""
    return columns.reshape(len(columns), 64, 64).transpose(0, 2, 1)


def _sklearn_cache() -> Path:
    return Path(os.environ.get("SCIKIT_LEARN_DATA", "~/scikit_learn_data")).expanduser() / "olivetti.pkz"


def load_olivetti(directory: Path | None) -> tuple[np.ndarray, str]:
    """The 400 upright Olivetti faces, uint8 ``(400, 64, 64)``, and where they came from.

    Looks in the data directory, ``$FISHERLAB_OLIVETTI``, then scikit-learn's cache (needs
    joblib); docs/data.md §4.

    Raises:
        DataNotFoundError: If none is found.
    """
    candidates = [directory / OLIVETTI_FILE] if directory is not None else []
    if os.environ.get(OLIVETTI_ENV):
        named = Path(os.environ[OLIVETTI_ENV]).expanduser()
        if not named.is_file():
            raise DataNotFoundError(f"${OLIVETTI_ENV} names {named}, which does not exist")
        candidates.append(named)
    for path in candidates:
        if path.is_file():
            faces = scipy.io.loadmat(path, variable_names=["faces"])["faces"]
            return olivetti_from_columns(faces.T), str(path.resolve())
    pkz = _sklearn_cache()
    if pkz.is_file():
        try:
            import joblib
        except ImportError:
            pass
        else:
            return olivetti_from_columns(np.asarray(joblib.load(pkz))), str(pkz)
    raise DataNotFoundError(
        f"FACES not found: put {ORIGINAL_FILE} or {OLIVETTI_FILE} (the 400 Olivetti faces, from which "
        f"FACES is regenerated) in --data-dir (or $FISHERLAB_DATA_DIR), or name the latter in ${OLIVETTI_ENV}"
    )


def _read_original(path: Path) -> np.ndarray:
    try:
        columns = scipy.io.loadmat(path, variable_names=["newfaces_single"])["newfaces_single"]
    except (NotImplementedError, KeyError) as exc:  # scipy raises NotImplementedError for v7.3 (HDF5) MAT files
        raise UserInputError(
            f"{path}: cannot read variable newfaces_single from a MATLAB v5/v7 file ({exc})"
        ) from exc
    side = int(round(np.sqrt(columns.shape[0])))
    return columns.T.reshape(-1, side, side).transpose(0, 2, 1).reshape(-1, side * side)


def load_faces(
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    params: FacesParams = FacesParams(),
) -> Dataset:
    """FACES as :class:`Dataset` (82,800 train, 20,700 validation, 41,400 test by default).

    Args:
        data_dir: Directory that may hold ``newfaces_rot_single.mat`` or
            ``olivettifaces.mat``; defaults to ``$FISHERLAB_DATA_DIR``.
        cache_dir: Cache for the regenerated set (see :func:`fisherlab.data.base.resolve_cache_dir`).
        params: Parameters of a regeneration; ignored when the original file is used.

    Raises:
        DataNotFoundError: If neither the original file nor the Olivetti faces are found.
    """
    directory = resolve_data_dir(data_dir)
    original = directory / ORIGINAL_FILE if directory is not None else None
    if original is not None and original.is_file():
        data = _read_original(original)
        meta = {"source": f"original {original}", "regenerated": False}
    else:
        olivetti, source = load_olivetti(directory)
        params_meta = settings(params, GENERATOR_VERSION)

        def generate() -> tuple[dict[str, np.ndarray], dict]:
            data, notes = regenerate_faces(olivetti, params)
            notes["olivetti_sha256"] = hashlib.sha256(np.ascontiguousarray(olivetti).tobytes()).hexdigest()
            return {"data": data}, notes

        arrays, notes, hit = cached(resolve_cache_dir(cache_dir), "faces", params_meta, generate)
        data = arrays["data"]
        meta = {
            "source": f"regenerated from the Olivetti faces in {source} "
            "(grid and geometry inferred, not published)",
            "regenerated": True,
            **params_meta,
            "lowpass_sigmas": [params.lowpass_sigma(s) for s in params.scales],
            "geometry": "magnify, rotate counter-clockwise about the centre, crop the central window, "
            "sample pixel centres bilinearly after a Gaussian low-pass, border clamped",
            "order": "person, image, angle, scale",
            "normalization": "per-pixel mean over the whole set removed, divided by one scalar so the mean "
            "per-pixel variance is 1",
            "normalization_scale": notes["normalization_scale"],
            "olivetti_sha256": notes["olivetti_sha256"],
            "generation_seconds": notes["seconds"],
            "cache_hit": hit,
        }
    if len(data) % N_PERSONS:
        raise UserInputError(
            f"FACES must hold {N_PERSONS} persons' images in order; {len(data)} rows do not divide"
        )
    per_person = len(data) // N_PERSONS
    pool = data[: TRAIN_PERSONS * per_person]
    test = data[len(data) - TEST_PERSONS * per_person :]
    n_train = len(pool) - len(pool) // 5
    train, val = random_split(pool, n_train)
    side = int(round(np.sqrt(data.shape[1])))
    meta.update(
        name="faces",
        image_shape=[side, side],
        split=f"persons 1-{TRAIN_PERSONS}: random {n_train}/{len(pool) - n_train}, seed {SPLIT_SEED}; "
        f"test: persons {N_PERSONS - TEST_PERSONS + 1}-{N_PERSONS}",
        split_seed=SPLIT_SEED,
    )
    return Dataset(train=to_tensor(train), val=to_tensor(val), test=to_tensor(test), meta=meta)
