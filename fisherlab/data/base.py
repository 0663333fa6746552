"""What the loaders share: the ``Dataset`` record, directories, the split, the disk cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fisherlab.errors import DataNotFoundError
from fisherlab.io import atomic_write

DATA_DIR_ENV = "FISHERLAB_DATA_DIR"
CACHE_DIR_ENV = "FISHERLAB_CACHE_DIR"
SPLIT_SEED = 0


#: Meta entries that describe a particular call of a loader, not the data set.
VOLATILE_META = frozenset({"cache_hit", "generation_seconds"})


@dataclass
class Dataset:
    """A benchmark data set, one example a row, pixels of each image in row-major order.

    Attributes:
        train: Training examples, float32 ``(n_train, d)``.
        val: Validation examples, float32 ``(n_val, d)``.
        test: Test examples, float32, or None.
        meta: ``source`` (where the data came from), ``regenerated`` (bool),
            ``image_shape``, the split, and every free parameter of a regeneration.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """``meta`` without the entries that describe one call (a cache hit, its timing):
        what identifies the data set in a run's settings."""
        return {k: v for k, v in self.meta.items() if k not in VOLATILE_META}


def resolve_data_dir(path: str | os.PathLike | None) -> Path | None:
    """The directory to search for original files: ``path``, else ``$FISHERLAB_DATA_DIR``.

    Raises:
        DataNotFoundError: If the directory is named but does not exist.
    """
    chosen = path if path is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    chosen = Path(chosen).expanduser()
    if not chosen.is_dir():
        raise DataNotFoundError(f"data directory {chosen} does not exist")
    return chosen


def resolve_cache_dir(path: str | os.PathLike | None) -> Path:
    """Where regenerated data sets are kept: ``path``, ``$FISHERLAB_CACHE_DIR``, or
    ``~/.cache/fisherlab``."""
    chosen = path if path is not None else os.environ.get(CACHE_DIR_ENV) or "~/.cache/fisherlab"
    return Path(chosen).expanduser()


def random_split(pool: np.ndarray, n_train: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split rows at random into ``n_train`` and the rest.

    Membership is that of ``torch.utils.data.random_split(pool, [n_train, rest],
    generator=torch.Generator().manual_seed(seed))``; both parts keep the pool's row order.
    """
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).numpy()
    return pool[np.sort(perm[:n_train])], pool[np.sort(perm[n_train:])]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor owning a copy of ``array``'s data (which may be a read-only memory map)."""
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))


def settings(params: Any, generator_version: int) -> dict[str, Any]:
    """A parameter dataclass as plain JSON types (tuples become lists), with the version
    of the generator, so that fresh and cached ``meta`` are identical."""
    return json.loads(json.dumps({**asdict(params), "generator_version": generator_version}))


def cache_key(name: str, params: dict[str, Any]) -> str:
    """File stem for a regenerated set: the name and a hash of its parameters."""
    text = json.dumps(params, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def cached(
    directory: Path,
    name: str,
    params: dict[str, Any],
    generate: Callable[[], tuple[dict[str, np.ndarray], dict]],
) -> tuple[dict[str, np.ndarray], dict[str, Any], bool]:
    """Arrays from the cache, or generated, written to the cache, and returned.

    Each array is one ``<stem>.<key>.npy`` file (so large ones can be memory-mapped) and
    ``<stem>.json`` holds the parameters and the generator's notes; the JSON is written
    last, so a set counts as cached only once it is complete. Every file is written to a
    temporary name and renamed, so concurrent or killed writers never leave a torn file.

    Args:
        directory: Cache directory.
        name: Data set name, the start of the file stem.
        params: Every parameter of the generation; hashed into the stem.
        generate: Returns ``(arrays, notes)``; ``notes`` must be JSON-serialisable.

    Returns:
        ``(arrays, notes, hit)``; cached arrays are read-only memory maps.
    """
    stem = cache_key(name, params)
    index = directory / f"{stem}.json"
    if index.is_file():
        record = json.loads(index.read_text())
        paths = {key: directory / f"{stem}.{key}.npy" for key in record["arrays"]}
        if all(p.is_file() for p in paths.values()):
            arrays = {key: np.load(p, mmap_mode="r") for key, p in paths.items()}
            return arrays, record["notes"], True
    arrays, notes = generate()
    for key, array in arrays.items():
        atomic_write(directory / f"{stem}.{key}.npy", lambda f, a=array: np.save(f, a))
    record = {"name": name, "params": params, "arrays": list(arrays), "notes": notes}
    atomic_write(index, json.dumps(record, indent=1, default=str))
    return arrays, notes, False
