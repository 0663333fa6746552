"""A user's model from ``FILE.py:FACTORY``: load it, check what it returns, turn its data into tensors.

``FACTORY()`` returns ``(model, train_set, likelihood)`` or ``(model, train_set,
validation_set, likelihood)``: an ``nn.Module`` whose output is the last pre-activation, data
sets yielding ``(input, target)`` pairs (a map-style ``Dataset`` such as ``TensorDataset``, any
iterable of pairs, or a ``DataLoader`` of batches) and a likelihood name of
:data:`fisherlab.likelihoods.LIKELIHOODS`. Everything that goes wrong is a
:class:`~fisherlab.errors.UserInputError` naming the factory, so the CLI reports it in one line.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fisherlab.errors import UserInputError
from fisherlab.likelihoods import LIKELIHOODS

__all__ = ["Factory", "dataset_tensors", "load_factory"]


@dataclass
class Factory:
    """What a factory returned, checked (:func:`load_factory`)."""

    spec: str
    model: nn.Module
    train_set: object
    validation_set: object | None
    likelihood: str


def load_factory(spec: str) -> Factory:
    """Import ``FILE.py``, call ``FACTORY()`` and check its result.

    Raises:
        UserInputError: a malformed spec, a missing file or name, a file or factory that
            raises, or a result that is not ``(model, train_set[, validation_set], likelihood)``
            with an ``nn.Module`` and a known likelihood name.
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or not name.isidentifier():
        raise UserInputError(f"--model takes FILE.py:FACTORY, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise UserInputError(f"{spec}: no file {path}")
    module_name = f"_fisherlab_factory_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        sys.modules[module_name] = module  # dataclasses and pickling look the module up
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: anything it raises is bad input
        sys.modules.pop(module_name, None)
        raise UserInputError(f"{spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserInputError(f"{spec}: {path} has no callable {name!r}")
    try:
        result = factory()
    except Exception as exc:
        raise UserInputError(f"{spec}: {name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, tuple) or len(result) not in (3, 4):
        raise UserInputError(f"{spec}: {name}() must return (model, train_set, likelihood) or "
                             f"(model, train_set, validation_set, likelihood), got {_kind(result)}")
    model, train_set, *middle, likelihood = result
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{spec}: the model {name}() returns must be an nn.Module, got {_kind(model)}")
    if not isinstance(likelihood, str) or likelihood not in LIKELIHOODS:
        raise UserInputError(f"{spec}: the likelihood {name}() returns must be one of {', '.join(LIKELIHOODS)}, "
                             f"got {likelihood!r}")
    return Factory(spec, model, train_set, middle[0] if middle else None, likelihood)


def dataset_tensors(data: object, what: str) -> tuple[Tensor, Tensor]:
    """All of a data set's ``(input, target)`` pairs as two tensors, inputs and targets stacked.

    Args:
        data: a map-style data set (``len`` and integer indexing), an iterable of pairs, or a
            ``DataLoader`` (its batches are concatenated).
        what: how to name the data set in messages.

    Raises:
        UserInputError: if it is empty, not iterable, or its items are not pairs of tensors
            (or numbers, for targets) of one shape each.
    """
    try:
        if isinstance(data, DataLoader):
            batches = [_pair(item, what) for item in data]
            if not batches:
                raise UserInputError(f"{what} is empty")
            return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            items = [data[i] for i in range(len(data))]
        else:
            items = list(data)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{what} cannot be read as (input, target) pairs: {type(exc).__name__}: {exc}") from exc
    if not items:
        raise UserInputError(f"{what} is empty")
    pairs = [_pair(item, what) for item in items]
    try:
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    except RuntimeError as exc:
        raise UserInputError(f"{what}: its inputs or targets differ in shape ({exc})") from exc


def _pair(item: object, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UserInputError(f"{what} must yield (input, target) pairs, got {_kind(item)}")
    x, y = item
    if not isinstance(x, Tensor):
        raise UserInputError(f"{what}: inputs must be tensors, got {_kind(x)}")
    try:
        return x, torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"{what}: targets must be tensors or numbers, got {_kind(y)}") from exc


def _kind(value: object) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__
