"""The benchmark's optimizer registry: every entry gets the same step budget and a 3-point learning-rate grid.

An :class:`OptimizerSpec` builds the transformation for one learning rate and one task. The runner calls
``tx.update(grads, state, params, value_fn=..., model_fn=..., loss=..., value=..., grad=...)`` for every
optimizer (see :mod:`optax_second_order.bench.runner`), so methods that need curvature extras (and optax's
own L-BFGS, which needs ``value``, ``grad`` and ``value_fn``) run unchanged; the others ignore them.

Adding an optimizer is one entry here::

    OPTIMIZERS["sophia-g"] = OptimizerSpec(
        make=lambda learning_rate, task: oso.sophia(learning_rate),
        learning_rates=(3e-3, 1e-3, 3e-4),
        description="Sophia-G (GNB diagonal), Liu et al. 2023",
    )

The grid is each method's usual default and its neighbours a factor ~3 away (the same size and spacing for
every method); ``--lrs`` replaces every grid with one common grid.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import optax

import optax_second_order as oso

if TYPE_CHECKING:
    from optax_second_order.bench.tasks import Task

__all__ = ["OptimizerSpec", "OPTIMIZERS", "REFERENCE", "only_extras"]

REFERENCE = "adam"
"""The optimizer every run includes: step-time ratios and the default target loss are relative to it."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How the benchmark builds one optimizer.

    Attributes:
      make: ``make(learning_rate, task) -> optax.GradientTransformation``; ``task`` gives access to the
        model (``task.module``) for methods that need it (layer capture) and the run's seed (``task.seed``, for
        optimizers that take one), and may be ignored.
      learning_rates: the default grid (3 values, best first is not required).
      description: one line for the tables and the docs.
      hvp: the runner's step computes the gradient with ``oso.grad_and_hvp_fn`` and passes its ``hvp_fn`` (for the
        Hutchinson estimators: one linearization for the gradient and the Hessian-vector product).
    """

    make: Callable[[float, "Task"], optax.GradientTransformation]
    learning_rates: tuple[float, ...]
    description: str
    hvp: bool = False


def only_extras(tx: optax.GradientTransformation, *names: str) -> optax.GradientTransformationExtraArgs:
    """``tx`` receiving only the extra arguments ``names`` (for transformations that reject unknown ones).

    optax's zoom line search forwards every extra argument it does not know to ``value_fn``, so
    ``optax.lbfgs`` gets only ``value``, ``grad`` and ``value_fn``.
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra_args):
        return tx.update(updates, state, params, **{k: v for k, v in extra_args.items() if k in names})

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        make=lambda learning_rate, task: optax.sgd(learning_rate, momentum=0.9),
        learning_rates=(0.3, 0.1, 0.03),
        description="optax.sgd, heavy-ball momentum 0.9",
    ),
    "adam": OptimizerSpec(
        make=lambda learning_rate, task: optax.adam(learning_rate),
        learning_rates=(1e-2, 3e-3, 1e-3),
        description="optax.adam (b1=0.9, b2=0.999, eps=1e-8), Kingma & Ba 2015",
    ),
    "adamw": OptimizerSpec(
        make=lambda learning_rate, task: optax.adamw(learning_rate, weight_decay=1e-4),
        learning_rates=(1e-2, 3e-3, 1e-3),
        description="optax.adamw, decoupled weight decay 1e-4, Loshchilov & Hutter 2019",
    ),
    "lbfgs": OptimizerSpec(
        make=lambda learning_rate, task: only_extras(optax.lbfgs(learning_rate), "value", "grad", "value_fn"),
        learning_rates=(1.0, 0.3, 0.1),
        description="optax.lbfgs, memory 10, zoom line search on the current batch (scaled by the learning rate)",
    ),
}

# --- Kronecker-factored matrix preconditioners (transforms/shampoo.py, transforms/soap.py) ---------------
# Blocks of 128: the statistics and the preconditioning cost ~2 * rows * cols * block_size per layer and step,
# so on CPU-sized layers (up to 1000 x 500 here) smaller blocks keep the step close to Adam's. Staggered refreshes
# (stagger=True: a tenth of the roots or bases on each step) keep the amortized cost and bound the slowest step.
OPTIMIZERS["shampoo"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.shampoo(learning_rate, precondition_frequency=10, block_size=128, stagger=True),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Shampoo, roots every 10 steps staggered over the 10, Adam grafting, momentum 0.9, blocks 128 "
    "(Gupta et al. 2018; Anil et al. 2020)",
)
OPTIMIZERS["shampoo-f100"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.shampoo(learning_rate, precondition_frequency=100, block_size=128, stagger=True),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Shampoo as above with roots every 100 steps",
)
OPTIMIZERS["soap"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.soap(learning_rate, precondition_frequency=10, block_size=128, stagger=True),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="SOAP, official defaults (betas 0.95, weight decay 0.01, eigenbasis every 10 steps) with blocks of "
    "128 and the refreshes staggered over the 10 steps, Vyas et al. 2024",
)

# --- K-FAC (transforms/kfac.py) --------------------------------------------------------------------


def _kfac(learning_rate, task: "Task", **options):
    """K-FAC on the task's linen module: its Dense/Conv layers captured once, the rest diagonal (all of it on a
    task without a module, such as Rosenbrock's function)."""
    import jax

    inputs = task.eval_batch[0]
    find_layers = oso.flax.find_layers if task.module is not None else oso.kronecker.find_layers
    layers = find_layers(lambda p: task.apply(p, inputs), task.init(jax.random.key(0)))
    return oso.kfac(learning_rate, layers, **options)


_KFAC = dict(damping=0.1, kl_clip=1e-2, precondition_frequency=10, stagger=True)
"""Shared by the K-FAC entries: damping 0.1 and KL clip 1e-2 (the library defaults 1e-3 / 1e-3 trained
digits-mlp poorly), inverses every 10 steps (the step-time target of issue #5), staggered over the layers."""

OPTIMIZERS["kfac"] = OptimizerSpec(
    make=lambda learning_rate, task: _kfac(learning_rate, task, statistics_frequency=10, seed=task.seed, **_KFAC),
    learning_rates=(0.3, 0.1, 0.03),
    description="K-FAC (true Fisher, factored Tikhonov damping 0.1, KL clip 1e-2, momentum 0.9), factors and inverses "
    "every 10 steps (amortized like the K-FAC PyTorch implementation's covariance period), Martens & Grosse 2015",
)
OPTIMIZERS["kfac-s1"] = OptimizerSpec(
    make=lambda learning_rate, task: _kfac(learning_rate, task, seed=task.seed, **_KFAC),
    learning_rates=(0.3, 0.1, 0.03),
    description="K-FAC as above with factors every step (the paper), inverses every 10 steps",
)
OPTIMIZERS["kfac-lm"] = OptimizerSpec(
    make=lambda learning_rate, task: _kfac(
        learning_rate, task, statistics_frequency=10, adaptive_damping=True, seed=task.seed, **_KFAC
    ),
    learning_rates=(0.3, 0.1, 0.03),
    description="K-FAC as 'kfac' with adaptive Levenberg-Marquardt damping every 5 steps (section 6.5)",
)
OPTIMIZERS["kfac-auto"] = OptimizerSpec(
    make=lambda learning_rate, task: _kfac(
        learning_rate, task, statistics_frequency=10, damping=0.1, kl_clip=None, precondition_frequency=10,
        adaptive_damping=True, adaptive_learning_rate=True, adaptive_momentum=True, stagger=True, seed=task.seed,
    ),
    learning_rates=(1.0, 0.5, 0.25),
    description="K-FAC with the step size and momentum of the quadratic model (section 7) and adaptive damping: "
    "K-FAC-JAX's default configuration; the learning rate multiplies the model's step",
)
OPTIMIZERS["ekfac"] = OptimizerSpec(
    make=lambda learning_rate, task: _kfac(
        learning_rate, task, statistics_frequency=10, approximation="eigenvalue_corrected", seed=task.seed, **_KFAC
    ),
    learning_rates=(0.3, 0.1, 0.03),
    description="EK-FAC (eigenvalue-corrected K-FAC, George et al. 2018), damping 0.1, KL clip 1e-2, bases and "
    "scales every 10 steps",
)

# --- diagonal preconditioners (transforms/diagonal.py) ----------------------------------------------
OPTIMIZERS["oso-adam"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.adam(learning_rate),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="oso.adam: Adam as the EMA'd squared-gradient (diagonal empirical Fisher) preconditioner; equals optax.adam",
)
OPTIMIZERS["oso-adagrad"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.adagrad(learning_rate),
    learning_rates=(0.3, 0.1, 0.03),
    description="oso.adagrad: running sum of squared gradients, initial 0.1; equals optax.adagrad",
)
OPTIMIZERS["adahessian"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.adahessian(learning_rate, seed=task.seed),
    learning_rates=(0.5, 0.15, 0.05),
    description="AdaHessian, official defaults (betas (0.9, 0.999), eps 1e-4, Hessian power 1, HVP every step), Yao et al. 2021",
    hvp=True,
)
OPTIMIZERS["sophia-g"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.sophia(learning_rate, estimator="gnb", weight_decay=1e-4, seed=task.seed),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Sophia-G (GNB diagonal every 10 steps, betas (0.965, 0.99), rho 0.04, weight decay 1e-4), Liu et al. 2023",
)
OPTIMIZERS["sophia-h"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.sophia(learning_rate, estimator="hutchinson", weight_decay=1e-4, seed=task.seed),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Sophia-H (Hutchinson diagonal every 10 steps, betas (0.965, 0.99), rho 0.04, weight decay 1e-4), Liu et al. 2023",
    hvp=True,
)
