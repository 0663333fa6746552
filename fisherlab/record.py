"""Record a training run: the per-sample Fisher statistics of every layer at chosen steps.

:func:`record` trains one of the paper's auto-encoders, a built-in network
(:data:`fisherlab.problems.TASKS`) or the user's own (``model="FILE.py:FACTORY"``,
:func:`fisherlab.problems.load_factory`), with Adam by default (the paper's Figure 1
setting), and, at steps ``0, K, 2K, …`` below the run's length, captures each chosen layer's
exact mini-batch Fisher block (:class:`fisherlab.capture.BlockCapture`: ``BlockStats`` for a
layer used once per sample, ``SharedBlock`` for a convolution or a ``Linear`` on sequences)
and writes it, with the dense block where it fits the byte budget, into an HDF5 run file
(:class:`fisherlab.store.RunWriter`). On the paper's MLPs the capture gives bit for bit what
the former ``nn.Linear``-only probe gave, so their recorded numbers did not change (tested
against a file of format 1).

What a recorded step means. Step ``s`` is the state after ``s`` optimizer updates. The
statistics recorded "at step ``s``" are taken at those parameters on the batch of update
``s + 1``, inside that update: forward pass, the probe's extra backward pass, the training
backward, the optimizer step. The probe never touches ``.grad`` and draws its Monte-Carlo
targets from a generator of its own, seeded from ``(seed, s)``, so a recorded run follows
exactly the trajectory of an unrecorded one, and of ``fisherlab train`` with the same
optimizer, batch size and seed: both are :class:`fisherlab.loop.Loop`, recording adds the
:class:`Recorder` hook.
The step's ``epoch`` attribute is the number of completed epochs, ``s // steps_per_epoch``;
``loss`` is the training loss of the batch.

Determinism. The weights come from ``problem.build_model(seed)``, the batch order from a
generator seeded with ``seed`` (one permutation per epoch, incomplete last batch dropped),
and the Monte-Carlo targets of step ``s`` from a generator seeded from ``(seed, s)``: one
seed gives the same file on a given device.

Resuming. After a recorded step, at most every :data:`CHECKPOINT_INTERVAL_S` seconds, and at
the end of the run, the loop's checkpoint (:class:`fisherlab.loop.Checkpoint`: the model, the
optimizer state and the batch generator's state, tied to the run's config) is saved
atomically to ``<out stem>.resume.pt`` beside the run file (:func:`checkpoint_path`). ``resume=True``
restores them and continues after the checkpointed step; recorded steps already in the
file are not written again. Without a usable checkpoint it replays the run from step 0,
which gives the same steps because the run is deterministic. The run's length is not part
of the stored configuration, so a finished run can be extended by resuming it with a larger
``steps`` or ``epochs``.

Custom problems (layer-size strings such as ``"12-6-12"``) have no data set of the paper;
they train on a small synthetic one (:func:`synthetic_dataset`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fisherlab.capture import BlockCapture
from fisherlab.data import Dataset, load_dataset
from fisherlab.device import DEFAULT_DEVICE, resolve_device
from fisherlab.errors import UserInputError
from fisherlab.kron import BlockStats
from fisherlab.kron.shared import KFAC_FORMS, SharedBlock
from fisherlab.likelihoods import FISHER_TYPES
from fisherlab.loop import Checkpoint, Hook, Loop
from fisherlab.optimizers import build_optimizer
from fisherlab.problems import Problem, Task, get_problem, get_task, load_factory
from fisherlab.store import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_DENSE_BUDGET,
    LayerSpec,
    RunWriter,
)

#: Optimizers ``record`` drives (the natural-gradient ones run a probe of their own).
OPTIMIZERS = ("adam", "sgd")
#: Adam's learning rate in the paper's Fisher-quality runs (the authors' code, Figure 1).
DEFAULT_LR = {"adam": 1e-3}
#: Epochs of the paper's Fisher-quality runs (the authors' code); custom problems get 10.
PAPER_EPOCHS = {"curves": 40, "mnist": 26, "faces": 32}
CUSTOM_EPOCHS = 10
#: Record at step 0 and every this many steps: about once an epoch on the paper's problems,
#: so that a paper-length run keeps 25 to 26 steps.
DEFAULT_EVERY = 100
#: Seconds between resume checkpoints (taken after a recorded step, and at the end).
CHECKPOINT_INTERVAL_S = 30.0
#: Synthetic data of custom problems: sizes and the seed of their one random stream.
SYNTHETIC_SIZES = (1024, 256)
SYNTHETIC_SEED = 0

_STEP_LIMIT = 10**8  # the store names steps with 8 digits
_MC_STREAM = 0x4D43  # separates the Monte-Carlo seeds from any other use of the run's seed
# Implementation switches of torch optimizers: they do not change the arithmetic's meaning.
_IMPLEMENTATION_KEYS = {"foreach", "fused", "capturable", "differentiable"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """A byte count from ``"1GB"``, ``"512MiB"``, ``"0"`` or an int.

    KB, MB, GB, TB (and K, M, G, T) are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.

    Raises:
        UserInputError: for a negative or unreadable size.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = _SIZE.match(str(text))
        if match is None:
            raise UserInputError(f"cannot read byte size {text!r}; write e.g. 0, 500MB or 1GiB")
        unit = (match.group(2) or "b").lower()
        scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
        value = int(float(match.group(1)) * scale)
    if value < 0:
        raise UserInputError(f"byte size must not be negative, got {text!r}")
    return value


def parse_layers(spec: str | int | Iterable[int], num_layers: int) -> list[int]:
    """1-based layer indices from ``"all"``, ``5``, ``"1,5"`` or ``[1, 5]``, sorted.

    Raises:
        UserInputError: for an index outside ``1 … num_layers``, a repeated one, or an
            unreadable spec.
    """
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(1, num_layers + 1))
        try:
            chosen = [int(part) for part in spec.split(",")]
        except ValueError:
            raise UserInputError(f"cannot read layers {spec!r}; write all, 5 or 1,5") from None
    elif isinstance(spec, (int, np.integer)):
        chosen = [int(spec)]
    else:
        chosen = list(spec)
    bad = [i for i in chosen if not isinstance(i, (int, np.integer)) or not 1 <= i <= num_layers]
    if bad or not chosen:
        raise UserInputError(
            f"layer indices must lie in 1..{num_layers} (the network has {num_layers}), got {bad or spec!r}"
        )
    if len(set(chosen)) != len(chosen):
        raise UserInputError(f"layer indices must not repeat, got {chosen}")
    return sorted(int(i) for i in chosen)


def checkpoint_path(out: str | os.PathLike) -> Path:
    """Where :func:`record` keeps the state to resume ``out`` from: ``run.h5`` → ``run.resume.pt``."""
    return Path(out).with_suffix(".resume.pt")


def synthetic_dataset(problem: Problem) -> Dataset:
    """A small seeded data set for a custom auto-encoder problem.

    Each example is ``x = M z`` with ``z ~ N(0, I_r)``, ``r`` the narrowest layer width and
    ``M`` a fixed Gaussian ``d × r`` matrix scaled by ``2/√r``; with a sigmoid output ``x``
    is passed through the sigmoid, giving pixels in (0, 1) on an ``r``-dimensional manifold
    that the auto-encoder can learn. The data do not depend on the run's seed.

    Raises:
        UserInputError: if the input and output sizes differ (an auto-encoder's target is
            its input).
    """
    sizes = problem.layer_sizes
    if sizes[0] != sizes[-1]:
        raise UserInputError(
            f"problem {problem.name!r} is not an auto-encoder: input size {sizes[0]} != output size {sizes[-1]}"
        )
    n_train, n_val = SYNTHETIC_SIZES
    rank = min(sizes)
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    mix = torch.randn(sizes[0], rank, generator=gen) * (2.0 / math.sqrt(rank))
    x = torch.randn(n_train + n_val, rank, generator=gen) @ mix.T
    if problem.output == "sigmoid":
        x = torch.sigmoid(x)
    meta = {
        "name": "synthetic",
        "source": "fisherlab.record.synthetic_dataset",
        "regenerated": True,
        "recipe": "x = M z, z ~ N(0, I_r), M ~ N(0, 4/r) fixed; sigmoid(x) for a sigmoid output",
        "rank": rank,
        "n_train": n_train,
        "n_val": n_val,
        "seed": SYNTHETIC_SEED,
    }
    return Dataset(train=x[:n_train].contiguous(), val=x[n_train:].contiguous(), test=None, meta=meta)


def _mc_seed(seed: int, step: int) -> int:
    # Seeding per step keeps the draws of step s independent of which steps were recorded
    # before it, so a resumed or replayed run draws the same targets.
    return int(np.random.SeedSequence((seed, _MC_STREAM, step)).generate_state(2, np.uint64)[0])


class Recorder(Hook):
    """The :class:`~fisherlab.loop.Hook` that records: the loop's steps, with the Fisher
    blocks captured at steps ``0, every, 2·every, …`` and written to the run file.

    On a capturing step the forward pass runs inside a :class:`~fisherlab.capture.BlockCapture`
    and its extra backward passes follow at once, before the training loss's backward pass;
    other steps cost what plain training costs. On the paper's MLPs the capture gives the same
    bits as the former ``nn.Linear``-only probe (tested), so their recorded numbers are those
    of format 1.

    Args:
        model: the network, whose supported layers are layers ``1 … L``.
        likelihood: the output distribution's name (:data:`fisherlab.likelihoods.LIKELIHOODS`).
        layers: 1-based indices of the layers to capture.
        writer: the run file (None: :meth:`forward` captures, nothing is written).
        every: capture every this many steps.
        dense_budget: bytes allowed per dense block written.
        fisher: ``"mc"`` (targets drawn from the model), ``"empirical"`` (the data's) or
            ``"exact"`` (the loss Hessian's square root).
        mc_samples: target draws per example for ``"mc"``.
        seed: the run's seed; step ``s`` draws its targets from a generator seeded from
            ``(seed, s)``.
        kfac: the KFAC form recorded for shared-weight layers.
        kfac_both: also compute and store the other form's factors, for analysis to compare
            them; None (default): only where ``kfac`` is ``"expand"``, whose activation factor
            is the costly one, so that adding reduce's costs little (LeNet-5:
            benchmarks/results/bench_record_cnn.txt).

    Raises:
        UserInputError: a module couples the samples (BatchNorm in training mode), or bad layers.

    Attributes:
        stats: the blocks of the last capturing step, ``{layer: BlockStats | SharedBlock}``, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        layers: Iterable[int],
        *,
        writer: RunWriter | None = None,
        every: int = DEFAULT_EVERY,
        dense_budget: int = 0,
        fisher: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        kfac: str = "expand",
        kfac_both: bool | None = None,
    ):
        self.likelihood = likelihood
        both = kfac == "expand" if kfac_both is None else kfac_both
        self.capture = BlockCapture(model, list(layers), kfac=kfac, kfac_forms=KFAC_FORMS if both else None)
        self.writer, self.every, self.dense_budget = writer, every, dense_budget
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.seed = seed
        self.stats: dict[int, BlockStats | SharedBlock] | None = None

    def due(self, step: int) -> bool:
        """Whether step ``step`` is captured: a multiple of ``every`` not in the file yet."""
        done = None if self.writer is None else self.writer.last_step
        return step % self.every == 0 and (done is None or step > done)

    def forward(self, model: nn.Module, x: Tensor, step: int, target: Tensor | None = None) -> Tensor:
        """The forward pass of step ``step``, with the blocks captured when due (``target``: the
        batch's targets, default ``x``)."""
        self.stats = None
        if not self.due(step):
            return model(x)
        with self.capture as capture:
            output = model(x)
            generator = None
            if self.fisher == "mc":
                generator = torch.Generator(device=x.device).manual_seed(_mc_seed(self.seed, step))
            self.stats = capture.capture(
                output,
                self.likelihood,
                fisher=self.fisher,
                targets=(x if target is None else target) if self.fisher == "empirical" else None,
                mc_samples=self.mc_samples,
                generator=generator,
            )
        return output

    def after_step(self, step: int, epoch: int, loss: float) -> bool:
        """Write the captured step; a written step asks for a checkpoint."""
        if self.stats is None or self.writer is None:
            return False
        self.writer.write_step(step, epoch, loss, self.stats, self.dense_budget)
        self.stats = None
        return True

    def postfix(self) -> dict:
        """The progress bar's ``recorded`` field: the last step in the run file (None before the first or without a writer)."""
        return {"recorded": None if self.writer is None else self.writer.last_step}

    def layer_specs(self, example: Tensor) -> dict[int, LayerSpec]:
        """The :class:`~fisherlab.store.LayerSpec` of every captured layer, from a forward pass
        on ``example`` (one input, batched) without a graph and with torch's random state restored."""
        shapes: dict[int, tuple[Tensor, Tensor]] = {}

        def keep(index: int):
            def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                shapes.setdefault(index, (inputs[0], output))

            return hook

        handles = [layer.adapter.module.register_forward_hook(keep(i)) for i, layer in self.capture.layers.items()]
        model = self.capture.model
        try:
            devices = [example.device] if example.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                model(example)
        finally:
            for handle in handles:
                handle.remove()
        specs = {}
        for i, layer in self.capture.layers.items():
            if i not in shapes:
                raise UserInputError(f"layer {i} ({layer.name}) is not used by the model's forward pass")
            adapter, module = layer.adapter, layer.adapter.module
            positions = adapter.unfold(*shapes[i]).shape[1]
            conv = {key: tuple(int(v) for v in getattr(module, attr))
                    for key, attr in (("kernel", "kernel_size"), ("stride", "stride"), ("padding", "padding"),
                                      ("dilation", "dilation")) if hasattr(module, attr)}
            specs[i] = LayerSpec(d_in=adapter.d_act - adapter.bias, d_out=adapter.d_out, bias=adapter.bias,
                                 kind=type(module).__name__, positions=positions,
                                 kfac_form=self.capture.kfac if positions > 1 else "", **conv)
        return specs


def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise UserInputError(f"{name} must be a positive integer, got {value!r}")


def _check_output(out: Path, force: bool, resume: bool) -> None:
    """Fail before the (possibly long) data loading if the run file cannot be written."""
    if force and resume:
        raise UserInputError("choose one of force (overwrite) and resume (continue)")
    if out.is_dir():
        raise UserInputError(f"cannot write run file {out}: it is a directory")
    if not out.parent.is_dir():
        raise UserInputError(f"cannot write run file {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write run file {out}: no permission to write in {out.parent}")
    if out.exists() and not (force or resume):
        raise UserInputError(f"run file {out} already exists; overwrite it with force or continue it with resume")


def record(
    problem: str = "curves",
    out: str | os.PathLike = "run.h5",
    *,
    optimizer: str = "adam",
    lr: float | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    every: int = DEFAULT_EVERY,
    layers: str | int | Iterable[int] = "all",
    fisher: str = "mc",
    mc_samples: int = 1,
    dense_budget: int | str = DEFAULT_DENSE_BUDGET,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = DEFAULT_DEVICE,
    force: bool = False,
    resume: bool = False,
    compression: str = DEFAULT_COMPRESSION,
    linear_code: bool = False,
    progress: bool = True,
    model: str | None = None,
    kfac: str = "expand",
    kfac_both: bool | None = None,
) -> Path:
    """Train ``problem`` (or the user's ``model``) and record the Fisher blocks of its layers into ``out``.

    Statistics are recorded at steps ``0, every, 2·every, …`` below the run's length (see
    the module docstring for what a step means and how resuming works). The file's
    ``config`` holds the problem, the optimizer and its settings, ``batch_size``, ``seed``,
    ``fisher_type``, ``mc_samples``, ``every``, ``layers`` and the data set's ``meta``.

    Args:
        problem: ``curves``, ``mnist``, ``faces``, a layer-size string (then trained on
            :func:`synthetic_dataset`), or a built-in network of :data:`fisherlab.problems.TASKS`
            (``mnist-cnn``, ``mnist-cnn-ae``); ignored when ``model`` is given.
        out: the HDF5 run file to write.
        optimizer: ``adam`` (betas 0.9, 0.999) or ``sgd`` (momentum 0.9).
        lr: learning rate; default 1e-3 for Adam (the paper's), required for SGD.
        batch_size: examples per step; default the problem's (CURVES 256, MNIST 512,
            FACES 1024, custom 64).
        epochs: passes over the training set (default: the paper's, CURVES 40, MNIST 26,
            FACES 32; custom 10). Exclusive with ``steps``.
        steps: optimizer steps in the run.
        every: record every this many steps (K).
        layers: ``"all"``, one index, ``"1,5"`` or a list of 1-based indices.
        fisher: ``"mc"`` (targets drawn from the model: the paper's), ``"empirical"`` (the
            data's targets) or ``"exact"`` (the loss Hessian's square root, no sampling).
        mc_samples: target draws per example for ``"mc"`` (k; N = k · batch_size).
        dense_budget: bytes allowed per dense block (``4 p²``), an int or e.g. ``"1GB"``;
            smaller blocks are stored densely too; 0 stores statistics only. The default,
            the store's 1 GiB, admits layer 5 of every problem; forming and compressing the
            admitted blocks costs seconds of CPU per recorded step.
        seed: seed of the weights, the batch order and the Monte-Carlo targets.
        data_dir: directory with the original data files (see :mod:`fisherlab.data`).
        cache_dir: cache of regenerated data sets (CURVES, FACES).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (:func:`fisherlab.device.resolve_device`).
        force: overwrite an existing ``out``.
        resume: continue ``out`` from its last checkpoint (create it if missing).
        compression: of the HDF5 datasets: ``"lzf"`` (default; plain h5py reads it),
            ``"gzip"`` (any HDF5 tool reads it), ``"lz4"`` or ``"zstd"`` (need hdf5plugin), or
            ``"none"``; :mod:`fisherlab.store` describes the trade-off.
        linear_code: no ReLU after the narrowest hidden layer (Hinton & Salakhutdinov's
            auto-encoders; the default, ReLU everywhere, is the authors' code).
        progress: show a progress bar (step, loss, ETA).
        model: ``FILE.py:FACTORY`` (:func:`fisherlab.problems.load_factory`): any network, its
            data and likelihood, trained instead of ``problem``.
        kfac: the KFAC form recorded for weight-sharing layers, ``"expand"`` or ``"reduce"``.
        kfac_both: also store the other form's factors, which analysis then reports as a
            ``kfac_reduce`` or ``kfac_expand`` row (docs/design.md §9.4); None (default): only
            with ``kfac="expand"``, where reduce's factors cost little (as :class:`Recorder`).

    Returns:
        The run file's path.

    Raises:
        UserInputError: for invalid settings, missing data or an unwritable or existing
            ``out``; nothing is written then.
        KeyboardInterrupt: when interrupted; every completed step stays in the file (a new
            file without any completed step is removed).
    """
    if optimizer not in OPTIMIZERS:
        raise UserInputError(f"unknown optimizer {optimizer!r}; record drives {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR.get(optimizer) if lr is None else lr
    if lr is None:
        raise UserInputError(f"{optimizer} has no default learning rate here; give lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserInputError(f"learning rate must be a positive number, got {lr!r}")
    for name, value in (
        ("batch size", batch_size),
        ("epochs", epochs),
        ("steps", steps),
        ("every", every),
        ("mc_samples", mc_samples),
    ):
        _check_positive(name, value)
    if epochs is not None and steps is not None:
        raise UserInputError("give epochs or steps, not both")
    if steps is not None and steps > _STEP_LIMIT:
        raise UserInputError(f"steps must be at most {_STEP_LIMIT:,}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"seed must be a non-negative integer, got {seed!r}")
    if fisher not in FISHER_TYPES:
        raise UserInputError(f"unknown fisher type {fisher!r}; valid: {', '.join(FISHER_TYPES)}")
    if fisher != "mc" and mc_samples != 1:
        raise UserInputError("mc_samples applies to fisher='mc' only")
    if kfac not in KFAC_FORMS:
        raise UserInputError(f"unknown KFAC form {kfac!r}; choose from {', '.join(KFAC_FORMS)}")
    if compression not in COMPRESSIONS:
        raise UserInputError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
    budget = parse_size(dense_budget)
    dev = resolve_device(device)
    out = Path(out)
    _check_output(out, force, resume)
    if model is not None or get_task(problem) is not None:
        if linear_code:
            raise UserInputError("linear_code applies to the paper's MLP auto-encoders only")
        task = load_factory(model, int(seed)) if model is not None else get_task(problem)(int(seed), data_dir)
        return _record_task(task, out, optimizer=optimizer, lr=float(lr), batch_size=batch_size, epochs=epochs,
                            steps=steps, every=int(every), layers=layers, fisher=fisher, mc_samples=int(mc_samples),
                            budget=budget, seed=int(seed), dev=dev, force=force, resume=resume,
                            compression=compression, progress=progress, kfac=kfac, kfac_both=kfac_both)
    prob = get_problem(problem, linear_code=bool(linear_code))
    chosen = parse_layers(layers, prob.num_layers)

    data = load_dataset(prob.dataset, data_dir, cache_dir) if prob.dataset else synthetic_dataset(prob)
    if data.train.shape[1] != prob.layer_sizes[0]:
        raise UserInputError(
            f"data set has {data.train.shape[1]} features, problem {prob.name!r} takes {prob.layer_sizes[0]}"
        )
    batch_size, steps, steps_per_epoch = _run_length(data.train.shape[0], prob.batch_size if batch_size is None else batch_size,
                                    steps, PAPER_EPOCHS.get(prob.name, CUSTOM_EPOCHS) if epochs is None else epochs)

    net = prob.build_model(seed=seed, device=dev)
    opt = build_optimizer(optimizer, net, prob, lr=float(lr))
    settings = {k: v for k, v in opt.defaults.items() if k not in _IMPLEMENTATION_KEYS}
    config = {
        "problem": prob.name,
        "layer_sizes": list(prob.layer_sizes),
        "output": prob.output,
        "linear_code": prob.linear_code,
        "optimizer": {"name": optimizer, **settings},
        "batch_size": batch_size,
        "seed": int(seed),
        "fisher_type": fisher,
        "mc_samples": int(mc_samples),
        "every": int(every),
        "layers": chosen,
        "dataset": data.provenance(),
        "dtype": "float32",
        "steps_per_epoch": steps_per_epoch,
        "recorded_at": "step s: parameters after s updates, batch of update s+1, before that update",
    }
    config_json = json.dumps(config, sort_keys=True, default=str)
    config = json.loads(config_json)  # plain JSON types, as the file will hold them
    checkpoint = Checkpoint(checkpoint_path(out), config)
    recorder = Recorder(net, prob.likelihood, chosen, every=int(every), dense_budget=budget, fisher=fisher,
                        mc_samples=int(mc_samples), seed=int(seed))
    train = data.train.to(dev)
    return _run(recorder, Loop(net, prob, opt, train, batch_size=batch_size, steps=steps, seed=int(seed), hook=recorder,
                               checkpoint=checkpoint, checkpoint_interval=CHECKPOINT_INTERVAL_S, progress=progress),
                checkpoint, out, config, train[:1], every=int(every), force=force, resume=resume, compression=compression)


def _run(recorder: Recorder, loop: Loop, checkpoint: Checkpoint, out: Path, config: dict, example: Tensor, *,
         every: int, force: bool, resume: bool, compression: str) -> Path:
    """Open the run file, run the loop with the recorder, and close the file (removing a new
    file without any step if the run fails)."""
    fresh = not (resume and out.exists())
    writer = RunWriter(out, config, recorder.layer_specs(example), force=force, resume=resume, compression=compression)
    recorder.writer = writer
    if force:
        checkpoint.remove()
    # Checkpoints cost about as much as a CURVES step: at most one per interval, after a
    # recorded step; a resume replays the few steps since the last one (the run is deterministic).
    dev = example.device
    try:
        if not fresh:
            done = writer.last_step  # steps <= done are in the file already
            first_missing = 0 if done is None else (done // every + 1) * every
            state = checkpoint.load(dev)
            # A checkpoint past the first missing step (from another run of this file) would skip it.
            if state is not None and state["step"] <= first_missing:
                loop.load_state_dict(state)
        loop.run()
    except BaseException:
        recorded_any = writer.last_step is not None
        writer.close(finished=False)
        if fresh and not recorded_any:  # an empty file would look like a run; keep nothing
            with suppress(OSError):
                out.unlink()
                checkpoint.remove()
        raise
    writer.close(finished=True)
    return out


def _run_length(n_train: int, batch_size: int, steps: int | None, epochs: int) -> tuple[int, int, int]:
    """The batch size, the number of steps (``epochs`` whole epochs where ``steps`` is None) and
    the steps per epoch.

    Raises:
        UserInputError: a batch larger than the training set, or more steps than a run file names.
    """
    batch_size = int(batch_size)
    if batch_size > n_train:
        raise UserInputError(f"batch size {batch_size} exceeds the {n_train} training examples")
    steps_per_epoch = n_train // batch_size
    if steps is None:
        steps = epochs * steps_per_epoch
        if steps > _STEP_LIMIT:
            raise UserInputError(f"{epochs} epochs make {steps:,} steps, more than {_STEP_LIMIT:,}")
    return batch_size, steps, steps_per_epoch


def _record_task(task: Task, out: Path, *, optimizer: str, lr: float, batch_size: int | None, epochs: int | None,
                 steps: int | None, every: int, layers, fisher: str, mc_samples: int, budget: int, seed: int,
                 dev: torch.device, force: bool, resume: bool, compression: str, progress: bool, kfac: str,
                 kfac_both: bool | None) -> Path:
    """:func:`record` for a :class:`~fisherlab.problems.Task` (any network, inputs with targets)."""
    net = task.model.to(dev)
    num_layers = len(BlockCapture(net).layers)
    chosen = parse_layers(layers, num_layers)
    default_batch = task.batch_size if batch_size is None else batch_size
    batch_size, steps, steps_per_epoch = _run_length(task.train_inputs.shape[0], default_batch, steps,
                                                     CUSTOM_EPOCHS if epochs is None else epochs)
    opt = build_optimizer(optimizer, net, task, lr=lr)
    settings = {k: v for k, v in opt.defaults.items() if k not in _IMPLEMENTATION_KEYS}
    config = {
        "problem": task.name,
        "likelihood": task.likelihood,
        "model": type(net).__name__,
        "optimizer": {"name": optimizer, **settings},
        "batch_size": batch_size,
        "seed": seed,
        "fisher_type": fisher,
        "mc_samples": mc_samples,
        "kfac": kfac,
        "kfac_both": kfac == "expand" if kfac_both is None else bool(kfac_both),
        "every": every,
        "layers": chosen,
        "dataset": task.meta,
        "dtype": "float32",
        "steps_per_epoch": steps_per_epoch,
        "recorded_at": "step s: parameters after s updates, batch of update s+1, before that update",
    }
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    checkpoint = Checkpoint(checkpoint_path(out), config)
    recorder = Recorder(net, task.likelihood, chosen, every=every, dense_budget=budget, fisher=fisher,
                        mc_samples=mc_samples, seed=seed, kfac=kfac, kfac_both=kfac_both)
    x, y = task.train_inputs.to(dev), task.train_targets.to(dev)
    loop = Loop(net, task, opt, x, train_targets=y, batch_size=batch_size, steps=steps, seed=seed, hook=recorder,
                checkpoint=checkpoint, checkpoint_interval=CHECKPOINT_INTERVAL_S, progress=progress)
    return _run(recorder, loop, checkpoint, out, config, x[:1], every=every, force=force, resume=resume,
                compression=compression)
