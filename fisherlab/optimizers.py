"""Optimizers by name: the two baselines and the paper's natural-gradient presets.

The natural-gradient module is imported only when one of its optimizers is asked for, so a
caller that trains with SGD or Adam (``fisherlab record``) does not load it.
"""

from __future__ import annotations

import torch
from torch import nn

from fisherlab.errors import UserInputError
from fisherlab.likelihoods import Likelihood
from fisherlab.problems import Problem

#: The paper's baselines (§4): SGD with momentum 0.9, Adam with betas (0.9, 0.999).
BASELINES = ("sgd", "adam")
SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)


def optimizer_names() -> tuple[str, ...]:
    """Every name :func:`build_optimizer` takes: the baselines, then the natural-gradient presets."""
    from fisherlab.optim import PRESETS

    return (*BASELINES, *PRESETS)


def build_optimizer(
    name: str,
    model: nn.Module,
    problem: Problem | Likelihood | str,
    *,
    lr: float,
    damping: float = 1e-3,
    clip: float | None = 1e-3,
    t1: int = 100,
    t2: int = 100,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    average: str | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    fit_options: dict | None = None,
    profile: str = "fisherlab",
    kl_form: str | None = None,
    stats_batch: int | None = None,
    fit_tol: float | None = None,
    fisher: str = "mc",
    kfac_form: str = "expand",
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :func:`optimizer_names`) over all of ``model``'s parameters.

    ``problem`` is the model's predictive distribution: a :class:`~fisherlab.problems.Problem`,
    a likelihood or a likelihood's name (:mod:`fisherlab.likelihoods`).
    ``damping``, ``clip`` (KL-clipping c, None for none), ``t1``, ``t2``, ``mc_samples``,
    ``fit_options``, ``stats_batch``, ``fit_tol``, ``fisher`` (``mc``, ``empirical``,
    ``exact``), ``kfac_form`` (``expand``, ``reduce``) and the profile (``profile``, a name of
    :data:`fisherlab.optim.PROFILES`, whose ``average`` and ``kl_form`` these two override
    where given) apply to the natural-gradient optimizers only.
    ``momentum`` defaults to 0.9 for SGD and 0 for the natural-gradient optimizers (the
    paper's settings); Adam uses betas (0.9, 0.999).

    Raises:
        UserInputError: for an unknown name or an invalid setting.
    """
    try:
        if name == "sgd":
            mom = SGD_MOMENTUM if momentum is None else momentum
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=weight_decay)
        if name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay)
        from fisherlab.optim import PRESETS, NaturalGradient

        if name in PRESETS:
            chosen = {k: v for k, v in (("average", average), ("kl_form", kl_form)) if v is not None}
            return NaturalGradient.from_preset(
                name,
                model,
                problem,
                profile=profile,
                **chosen,
                stats_batch=stats_batch,
                fit_tol=fit_tol,
                lr=lr,
                damping=damping,
                kl_clip=clip,
                t_stats=t1,
                t_inv=t2,
                momentum=0.0 if momentum is None else momentum,
                weight_decay=weight_decay,
                mc_samples=mc_samples,
                fit_options=fit_options,
                seed=seed,
                fisher=fisher,
                kfac_form=kfac_form,
            )
    except ValueError as exc:
        raise UserInputError(f"{name}: {exc}") from exc
    raise UserInputError(f"unknown optimizer {name!r}; choose from {', '.join(optimizer_names())}")
