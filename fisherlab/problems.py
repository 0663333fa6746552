"""The benchmark problems: the deep auto-encoders of the paper and custom MLPs.

Three networks of the paper (Koroko et al. 2022, Appendix D; the auto-encoder benchmarks
of Hinton & Salakhutdinov 2006, Martens 2010 and Martens & Grosse 2015):

=======  ==============================================  ===========================  =====
name     layer sizes                                     output and loss              batch
=======  ==============================================  ===========================  =====
curves   784-400-200-100-50-25-6-25-50-100-200-400-784   sigmoid, binary cross-entr.  256
mnist    784-1000-500-250-30-250-500-1000-784            sigmoid, binary cross-entr.  512
faces    625-2000-1000-500-30-500-1000-2000-625          linear, squared error        1024
=======  ==============================================  ===========================  =====

Any other MLP is named by its layer sizes: ``"20-10-20"`` is ReLU hidden layers with a
sigmoid output and binary cross-entropy (``"sigmoid:20-10-20"`` says so explicitly);
``"linear:20-10-20"`` has a linear output and squared error. Custom MLPs have batch size
64 and no data set.

Choices that the paper leaves open, and what is done here:

- **Code layer.** Hinton & Salakhutdinov (2006) and Martens (2010) use logistic hidden
  units and a *linear* code layer (the 30- or 6-unit middle layer). The paper replaces the
  logistic units by ReLU and its Appendix D names no exception; the authors' public code
  (github.com/Abdoulaye-Koroko/natural-gradients, ``models/models.py``) puts a ReLU after
  every hidden layer, the code layer included. The default follows the paper and its code
  (ReLU everywhere); ``get_problem(name, linear_code=True)`` gives the classic linear code
  layer (the narrowest hidden layer, the first one if several tie).
- **Initialisation.** Martens' sparse initialisation (15 nonzero N(0, 1) incoming weights
  per unit) was designed for logistic units; with ReLU it multiplies the second moment of
  the activations by about 7.5 per layer. Weights here are He (Kaiming) normal,
  ``std = gain / sqrt(fan_in)`` with ``gain = sqrt(2)`` where the layer's input comes out
  of a ReLU and ``gain = 1`` otherwise (the first layer, and the layer after a linear code
  layer); biases are zero. They are drawn in float32 on the CPU from a generator seeded
  with ``seed``, so one seed gives the same network on every device, a float64 network
  holds exactly the float32 values, and the global torch random state is left alone.
- **Losses** are negative log-likelihoods summed over output units: binary cross-entropy
  with logits for the sigmoid output (with targets in [0, 1], as for grey-level pixels);
  ``0.5 ‖y − t‖²`` for the unit-variance Gaussian of the linear output, whose constant
  ``(d/2) log 2π`` is dropped (it changes neither gradients nor the Fisher matrix).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fisherlab.errors import UserInputError

Output = Literal["sigmoid", "linear"]

_PAPER = {
    # name: (layer sizes, output, batch size)
    "curves": ((784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784), "sigmoid", 256),
    "mnist": ((784, 1000, 500, 250, 30, 250, 500, 1000, 784), "sigmoid", 512),
    "faces": ((625, 2000, 1000, 500, 30, 500, 1000, 2000, 625), "linear", 1024),
}
CUSTOM_BATCH_SIZE = 64
_CUSTOM = re.compile(r"^(?:(sigmoid|linear):)?(\d+(?:-\d+)+)$")
_HELP = (
    "valid problems: curves, mnist, faces, or layer sizes such as '20-10-20' "
    "(sigmoid output, binary cross-entropy) or 'linear:20-10-20' (linear output, squared error)"
)


@dataclass(frozen=True)
class Problem:
    """A network architecture with its output distribution and training loss.

    Attributes:
        name: ``curves``, ``mnist``, ``faces``, or the canonical layer-size string.
        layer_sizes: Widths from input to output; layer ``i`` (1-based) maps
            ``layer_sizes[i-1]`` to ``layer_sizes[i]`` units.
        output: ``"sigmoid"`` (Bernoulli outputs, binary cross-entropy) or ``"linear"``
            (unit-variance Gaussian outputs, squared error).
        batch_size: The paper's mini-batch size (64 for a custom MLP).
        dataset: Name for :func:`fisherlab.data.load_dataset`, or None.
        linear_code: Whether the narrowest hidden layer has no ReLU.
    """

    name: str
    layer_sizes: tuple[int, ...]
    output: Output
    batch_size: int
    dataset: str | None
    linear_code: bool = False

    @property
    def num_layers(self) -> int:
        """Number of ``nn.Linear`` layers, L."""
        return len(self.layer_sizes) - 1

    @property
    def num_parameters(self) -> int:
        """Number of weights and biases, ``Σ_i d_out (d_in + 1)``."""
        return sum((d_in + 1) * d_out for d_in, d_out in pairwise(self.layer_sizes))

    @property
    def code_layer(self) -> int | None:
        """1-based index of the linear layer whose output is the linear code, or None."""
        if not self.linear_code:
            return None
        hidden = self.layer_sizes[1:-1]
        return hidden.index(min(hidden)) + 1

    def build_model(
        self,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> nn.Sequential:
        """A freshly initialised network; its output is the last pre-activation.

        Args:
            seed: Seed of the weight initialisation (see the module docstring).
            dtype: Floating-point type of the parameters.
            device: Device of the parameters.

        Returns:
            ``nn.Sequential`` of ``nn.Linear`` layers 1..L with ``nn.ReLU`` between them
            (none after the code layer when ``linear_code``, none after layer L).
        """
        generator = torch.Generator().manual_seed(seed)
        modules: list[nn.Module] = []
        relu_input = False
        for i, (d_in, d_out) in enumerate(pairwise(self.layer_sizes), start=1):
            layer = nn.utils.skip_init(nn.Linear, d_in, d_out, device=device, dtype=dtype)
            std = (math.sqrt(2.0) if relu_input else 1.0) / math.sqrt(d_in)
            weight = torch.randn(d_out, d_in, generator=generator) * std
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.zero_()
            modules.append(layer)
            relu_input = i < self.num_layers and i != self.code_layer
            if relu_input:
                modules.append(nn.ReLU())
        return nn.Sequential(*modules)

    def linear_layers(self, model: nn.Module) -> list[nn.Linear]:
        """The ``nn.Linear`` layers of ``model`` in order: element ``i-1`` is layer ``i``.

        Raises:
            ValueError: If ``model`` does not have this problem's layer sizes.
        """
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        sizes = tuple([layers[0].in_features] + [m.out_features for m in layers]) if layers else ()
        if sizes != self.layer_sizes:
            raise ValueError(f"model has layer sizes {sizes}, problem {self.name!r} has {self.layer_sizes}")
        return layers

    def per_example_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each example, summed over output units.

        Args:
            output: Last pre-activation, shape ``(B, d)``: logits for ``sigmoid``, the mean
                for ``linear``.
            target: Targets of the same shape.

        Returns:
            Shape ``(B,)``: ``Σ_j BCE(σ(output_j), t_j)`` or ``0.5 Σ_j (output_j − t_j)²``.
        """
        if output.shape != target.shape:
            raise ValueError(f"output shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
        if self.output == "sigmoid":
            nll = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        else:
            nll = 0.5 * (output - target).square()
        return nll.flatten(1).sum(dim=1)

    @property
    def likelihood(self) -> str:
        """The output distribution's name in :data:`fisherlab.likelihoods.LIKELIHOODS`."""
        return "bernoulli" if self.output == "sigmoid" else "gaussian"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss: the batch mean of :meth:`per_example_loss`."""
        return self.per_example_loss(output, target).mean()

    def predictive_mean(self, output: torch.Tensor) -> torch.Tensor:
        """Mean of the predictive distribution: ``sigmoid(output)`` or ``output`` itself."""
        return torch.sigmoid(output) if self.output == "sigmoid" else output

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution (for the MC Fisher).

        Args:
            output: Last pre-activation, shape ``(B, d)``; not differentiated through.
            generator: Random generator on ``output``'s device, or None for the global one.

        Returns:
            ``Bernoulli(sigmoid(output))`` samples (0. or 1.) or ``output + N(0, I)``, with
            the dtype and device of ``output``.
        """
        output = output.detach()
        if self.output == "sigmoid":
            return torch.bernoulli(torch.sigmoid(output), generator=generator)
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return output + noise


def problem_names() -> list[str]:
    """Names of the paper's problems."""
    return list(_PAPER)


def get_problem(name: str, *, linear_code: bool = False) -> Problem:
    """Look a problem up by name or layer-size string.

    Args:
        name: ``curves``, ``mnist``, ``faces`` (any case), or ``[sigmoid:|linear:]d0-d1-…-dL``
            with at least two positive sizes.
        linear_code: Drop the ReLU after the narrowest hidden layer (see the module
            docstring); needs at least one hidden layer.

    Raises:
        UserInputError: For an unknown name or a malformed size string; the message lists
            the valid names.
    """
    key = name.strip().lower()
    if key in _PAPER:
        sizes, output, batch = _PAPER[key]
        problem = Problem(key, sizes, output, batch, key, linear_code)
    else:
        match = _CUSTOM.match(key.replace(" ", ""))
        if match is None:
            raise UserInputError(f"unknown problem {name!r}; {_HELP}")
        output = match.group(1) or "sigmoid"
        sizes = tuple(int(s) for s in match.group(2).split("-"))
        if min(sizes) < 1:
            raise UserInputError(f"layer sizes must be positive in {name!r}; {_HELP}")
        canonical = "-".join(map(str, sizes))
        canonical = f"linear:{canonical}" if output == "linear" else canonical
        problem = Problem(canonical, sizes, output, CUSTOM_BATCH_SIZE, None, linear_code)
    if linear_code and len(problem.layer_sizes) < 3:
        raise UserInputError(f"linear_code needs a hidden layer, {name!r} has none")
    return problem


# -- any network ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A network of any architecture with its data, as ``record`` trains it (a :class:`Problem`
    for networks other than the paper's MLPs).

    Attributes:
        name: what the run's config calls it (a built-in name or ``FILE.py:FACTORY``).
        model: the network; its supported layers (:mod:`fisherlab.layers`) are layers 1 … L.
        likelihood: the output distribution, a name in :data:`fisherlab.likelihoods.LIKELIHOODS`.
        train_inputs, train_targets: one example a row (inputs of any shape after the first).
        val_inputs, val_targets: validation examples, or None.
        batch_size: the default batch size.
        meta: the data's provenance (stored in the run's config).
    """

    name: str
    model: nn.Module
    likelihood: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None
    batch_size: int = CUSTOM_BATCH_SIZE
    meta: dict = field(default_factory=dict)

    def _likelihood(self):
        from fisherlab.likelihoods import get_likelihood

        return get_likelihood(self.likelihood)

    def per_example_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The likelihood's negative log-likelihood of each example, ``(B,)``."""
        return self._likelihood().per_example_loss(output, target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss: the batch mean of :meth:`per_example_loss`."""
        return self.per_example_loss(output, target).mean()

    def sample_targets(self, output: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution (for the MC Fisher)."""
        return self._likelihood().sample_targets(output, generator)


def _as_tensors(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a data set of ``(input, target)`` pairs (or a DataLoader of such batches) into two tensors."""
    from torch.utils.data import DataLoader

    inputs, targets = [], []
    try:
        for item in data:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise UserInputError(f"{what} must yield (input, target) pairs, got {type(item).__name__}")
            x, y = (torch.as_tensor(v) for v in item)
            inputs.append(x)
            targets.append(y)
    except UserInputError:
        raise
    except Exception as exc:  # the user's data set: any failure is bad input
        raise UserInputError(f"{what} cannot be read: {_one_line(exc)}") from None
    if not inputs:
        raise UserInputError(f"{what} is empty")
    join = torch.cat if isinstance(data, DataLoader) else torch.stack
    try:
        x, y = join(inputs), join(targets)
    except RuntimeError as exc:
        raise UserInputError(f"{what}: its examples differ in shape ({_one_line(exc)})") from None
    return (x.float() if x.is_floating_point() else x), (y.float() if y.is_floating_point() else y)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_factory(spec: str, seed: int = 0) -> Task:
    """The :class:`Task` of ``FILE.py:FACTORY``: ``FACTORY()`` returns ``(model, train_set,
    likelihood)`` or ``(model, train_set, validation_set, likelihood)``.

    The data sets yield ``(input, target)`` pairs (a ``torch.utils.data.Dataset``, a list, or
    a DataLoader of batches) and are held in memory as tensors; ``likelihood`` is a name in
    :data:`fisherlab.likelihoods.LIKELIHOODS`. The factory runs with torch's global random
    state seeded with ``seed`` (and restored afterwards), so ``seed`` fixes the weights of a
    model built with torch's default initialization.

    Raises:
        UserInputError: a malformed spec, a file that cannot be imported, a factory that fails
            or returns the wrong kind of thing, an unknown likelihood, targets that do not fit
            the model's output, or a module that couples the samples (BatchNorm in training mode).
    """
    import importlib.util
    import sys
    from pathlib import Path

    from fisherlab.layers import coupling_module
    from fisherlab.likelihoods import get_likelihood

    path_text, sep, factory_name = spec.rpartition(":")
    if not sep or not path_text or not factory_name.isidentifier():
        raise UserInputError(f"--model must be FILE.py:FACTORY, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise UserInputError(f"model file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"fisherlab_user_model_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UserInputError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # what dataclasses and pickling in the file look up
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise UserInputError(f"importing {path} failed: {_one_line(exc)}") from None
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise UserInputError(f"{path} has no callable {factory_name!r}")
        try:
            result = factory()
        except Exception as exc:
            raise UserInputError(f"{spec}() failed: {_one_line(exc)}") from None
    if not isinstance(result, tuple) or len(result) not in (3, 4):
        raise UserInputError(f"{spec}() must return (model, train_set, likelihood) or "
                             f"(model, train_set, validation_set, likelihood), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
    model, train_set, *rest = result
    val_set, likelihood = (None, rest[0]) if len(rest) == 1 else rest
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{spec}() must return an nn.Module first, got {type(model).__name__}")
    if not isinstance(likelihood, str):
        raise UserInputError(f"{spec}() must return a likelihood name last, got {type(likelihood).__name__}")
    lik = get_likelihood(likelihood)
    coupled = coupling_module(model)
    if coupled is not None:
        raise UserInputError(f"module {coupled!r} of {spec} normalizes with batch statistics (batch normalization in "
                             "training mode): per-sample gradients are undefined; put it in eval mode")
    x, y = _as_tensors(train_set, f"{spec}'s training set")
    val = None if val_set is None else _as_tensors(val_set, f"{spec}'s validation set")
    check_targets(model, lik, x, y, spec)
    return Task(spec, model, lik.name, x, y, *(val or (None, None)),
                meta={"name": spec, "source": str(path.resolve()), "n_train": x.shape[0],
                      "n_val": 0 if val is None else val[0].shape[0]})


def check_targets(model: nn.Module, likelihood, inputs: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    """Run the model on two examples and check that their targets fit its output.

    Raises:
        UserInputError: the model fails on the inputs, or the targets do not fit.
    """
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            output = model(inputs[:2])
    except Exception as exc:
        raise UserInputError(f"{name}: the model fails on the training inputs: {_one_line(exc)}") from None
    if not isinstance(output, torch.Tensor):
        raise UserInputError(f"{name}: the model must return one tensor, got {type(output).__name__}")
    try:
        likelihood.check_targets(output, targets[:2].to(output.device))
    except UserInputError as exc:
        raise UserInputError(f"{name}: {exc}") from None


def lenet5() -> nn.Module:
    """LeNet-5 for 28 × 28 MNIST: conv 5×5 (6, padding 2) → max-pool → conv 5×5 (16) → max-pool →
    Linear 400-120-84-10, ReLU; torch's default initialization."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 28 → 28 → 14
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # 14 → 10 → 5
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def conv_autoencoder() -> nn.Module:
    """The paper authors' convolutional auto-encoder as issue 12 describes it: Conv2d 1→6 and 6→16
    (5 × 5, no padding), ConvTranspose2d 16→6 and 6→1 back, LeakyReLU(0.2) between them; the
    output is the logit of a Bernoulli (sigmoid output, binary cross-entropy)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.LeakyReLU(0.2),  # 28 → 24
        nn.Conv2d(6, 16, 5), nn.LeakyReLU(0.2),  # 24 → 20
        nn.ConvTranspose2d(16, 6, 5), nn.LeakyReLU(0.2),  # 20 → 24
        nn.ConvTranspose2d(6, 1, 5),  # 24 → 28
    )


def _mnist_task(name: str, build: Callable[[], nn.Module], likelihood: str, classifier: bool):
    def load(seed: int, data_dir: str | None = None) -> Task:
        from fisherlab.data import load_dataset
        from fisherlab.data.mnist import load_mnist_labels

        data = load_dataset("mnist", data_dir)
        x, val = data.train.reshape(-1, 1, 28, 28), data.val.reshape(-1, 1, 28, 28)
        if classifier:
            labels, val_labels = (torch.from_numpy(v.astype("int64")) for v in load_mnist_labels(data_dir))
            y, val_y = labels, val_labels
        else:
            y, val_y = x, val
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
        return Task(name, model, likelihood, x, y, val, val_y, batch_size=512,
                    meta={**data.provenance(), **({"labels": "train-labels-idx1-ubyte"} if classifier else {})})

    return load


#: Built-in networks beyond the paper's MLPs: name → loader ``(seed, data_dir) -> Task``.
TASKS: dict[str, Callable[[int, str | None], Task]] = {
    "mnist-cnn": _mnist_task("mnist-cnn", lenet5, "categorical", classifier=True),
    "mnist-cnn-ae": _mnist_task("mnist-cnn-ae", conv_autoencoder, "bernoulli", classifier=False),
}


def get_task(name: str) -> Callable[[int, str | None], Task] | None:
    """The loader ``(seed, data_dir) -> Task`` of a built-in network of :data:`TASKS`, or None."""
    return TASKS.get(name.strip().lower()) if isinstance(name, str) else None
