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
from optax_second_order.curvature.quantize import Quantizer

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
    make=lambda learning_rate, task: oso.shampoo(learning_rate, precondition_frequency=10, block_size=128, stagger=True,
                                                 layer_axes=task.layer_axes),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Shampoo, roots every 10 steps staggered over the 10, Adam grafting, momentum 0.9, blocks 128 "
    "(Gupta et al. 2018; Anil et al. 2020)",
)
OPTIMIZERS["shampoo-f100"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.shampoo(learning_rate, precondition_frequency=100, block_size=128, stagger=True,
                                                 layer_axes=task.layer_axes),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Shampoo as above with roots every 100 steps",
)
OPTIMIZERS["soap"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.soap(learning_rate, precondition_frequency=10, block_size=128, stagger=True,
                                              layer_axes=task.layer_axes),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="SOAP, official defaults (betas 0.95, weight decay 0.01, eigenbasis every 10 steps) with blocks of "
    "128 and the refreshes staggered over the 10 steps, Vyas et al. 2024",
)
# Memory-saving configurations (issue 22, docs/memory.md): 4-bit Shampoo (Wang et al. 2024: statistics as float32
# eigenvalues and a 4-bit eigenbasis, roots 4-bit with a float32 diagonal) with the statistics every 10 steps (each
# costs an eigh per factor; the paper gathers them every 100), bfloat16 momentum and small factors; SOAP with 4-bit
# bases (used as dequantized: Björck's rectification on every step cost more than it changed the loss) and bfloat16
# factors and moments. SOAP's one_sided / factorized_second_moment (the paper's sec. 7) are smaller and faster but
# missed issue 22's 1% loss bound on digits-autoencoder (+1.4% / +3.4%; docs/memory.md), so they are not used here.
OPTIMIZERS["shampoo-lowmem"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.shampoo(learning_rate, precondition_frequency=10, block_size=128, stagger=True,
                                                 layer_axes=task.layer_axes,
                                                 statistics_frequency=10, quantize=4, state_dtype="bfloat16"),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="Shampoo as above with 4-bit eigenbases and roots (4-bit Shampoo, Wang et al. 2024), statistics "
    "every 10 steps, bfloat16 momentum",
)
OPTIMIZERS["soap-lowmem"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.soap(learning_rate, precondition_frequency=10, block_size=128, stagger=True,
                                              layer_axes=task.layer_axes,
                                              quantize=Quantizer(4, rectify=0), state_dtype="bfloat16"),
    learning_rates=(1e-2, 3e-3, 1e-3),
    description="SOAP as above with 4-bit eigenbases and bfloat16 factors and moments",
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
OPTIMIZERS["kfac-lowmem"] = OptimizerSpec(
    make=lambda learning_rate, task: _kfac(learning_rate, task, statistics_frequency=10, seed=task.seed,
                                           state_dtype="bfloat16", **_KFAC),
    learning_rates=(0.3, 0.1, 0.03),
    description="K-FAC as 'kfac' with its factors and inverses stored in bfloat16 between steps (issue 22)",
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
    learning_rates=(3e-3, 1e-3, 3e-4),
    description="Sophia-G (GNB diagonal every 10 steps, betas (0.965, 0.99), rho 0.04, weight decay 1e-4), Liu et al. 2023",
)
OPTIMIZERS["sophia-h"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.sophia(learning_rate, estimator="hutchinson", weight_decay=1e-4, seed=task.seed),
    learning_rates=(3e-3, 1e-3, 3e-4),
    description="Sophia-H (Hutchinson diagonal every 10 steps, betas (0.965, 0.99), rho 0.04, weight decay 1e-4), Liu et al. 2023",
    hvp=True,
)

# --- the solve-based family (transforms/newton.py) ---------------------------------------------------
# These methods choose their own step (the reduction ratio, backtracking or the KL budget): learning rate 1 is the one
# to use, and the grid's 0.3 and 0.1 show what a shorter step does. CG is capped at 20 iterations (50 for HF, whose
# progress rule usually stops it earlier) so that a step costs tens of gradients, not hundreds. The Levenberg-Marquardt
# entries keep the damping at least 0.1: the reduction ratio is measured on the step's own minibatch, so with a free
# floor the rule lowers the damping until the steps fit the batch and not the data (on digits-autoencoder HF's loss on
# all digits went from 14.3 back up to 95 between steps 40 and 100 with min_damping=1e-8).
_NEWTON_LRS = (1.0, 0.3, 0.1)
OPTIMIZERS["newton-cg"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.newton_cg(learning_rate, maxiter=20),
    learning_rates=_NEWTON_LRS,
    description="Newton-CG: Hessian-vector products, CG (at most 20 iterations, forcing term min(0.5, sqrt|g|)) stopped at "
    "negative curvature, Levenberg-Marquardt damping from 1 with rejection of rho <= 0 (Nocedal & Wright 2006, Alg. 7.1)",
)
OPTIMIZERS["levenberg-marquardt"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.levenberg_marquardt(learning_rate, maxiter=20, min_damping=0.1),
    learning_rates=_NEWTON_LRS,
    description="Gauss-Newton (GGN) + CG (at most 20 iterations), Levenberg-Marquardt damping from 1 (2/3, 3/2; Martens "
    "2010), at least 0.1, with rejection of rho <= 0",
)
OPTIMIZERS["hessian-free"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.hessian_free(
        learning_rate, maxiter=50, preconditioner="empirical_fisher_estimate", min_damping=0.1
    ),
    learning_rates=_NEWTON_LRS,
    description="Hessian-free (Martens 2010): GGN + CG with his progress stop (at most 50 iterations), warm start 0.95, "
    "(diag(F_emp) + lambda)^-0.75 with diag(F_emp) from random signs, CG-backtracking, LM damping from 1, at least 0.1",
)
OPTIMIZERS["natural-gradient"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.natural_gradient(learning_rate, kl_budget=1e-2, maxiter=20),
    learning_rates=_NEWTON_LRS,
    description="Natural gradient: sampled true Fisher + CG (at most 20 iterations), damping 1e-3, KL-normalized step "
    "eta = sqrt(2 * 0.01 / g^T F^-1 g) (KL per step 0.01 lr^2)",
)

# --- quasi-Newton and K-BFGS (transforms/quasi_newton.py, transforms/kbfgs.py) ---------------------------
# On minibatches the quasi-Newton methods run in their stochastic mode: a fixed learning rate, no line search,
# pairs formed on the same minibatch (one extra gradient per step). Deterministic problems, with line searches
# and evaluation counts, are in `python -m optax_second_order.bench quasi-newton` (bench/quasi_newton.py).


def _kbfgs(learning_rate, task: "Task", **options):
    """K-BFGS on the task's linen module: its Dense/Conv layers captured once, the rest diagonal."""
    import jax

    inputs = task.eval_batch[0]
    find_layers = oso.flax.find_layers if task.module is not None else oso.kronecker.find_layers
    layers = find_layers(lambda p: task.apply(p, inputs), task.init(jax.random.key(0)))
    return oso.kbfgs(learning_rate, layers, **options)


OPTIMIZERS["kbfgs"] = OptimizerSpec(
    make=lambda learning_rate, task: _kbfgs(learning_rate, task),
    learning_rates=(3.0, 1.0, 0.3),  # the authors' 0.3 and above: 0.3 was the best of (0.3, 0.1, 0.03) on digits-mlp
    description="K-BFGS (Goldfarb, Ren & Bahamou 2020): BFGS on H_g with double damping, Hessian-action BFGS on "
    "H_a, damping 0.3, momentum 0.9; two extra forward/backward passes per step",
)
OPTIMIZERS["kbfgs-l"] = OptimizerSpec(
    make=lambda learning_rate, task: _kbfgs(learning_rate, task, limited_memory=True),
    learning_rates=(3.0, 1.0, 0.3),
    description="K-BFGS(L): as K-BFGS with H_g an L-BFGS memory of 100 pairs (H_0 = I; the same steps as K-BFGS "
    "while no pair has left the memory)",
)
OPTIMIZERS["lbfgs-stochastic"] = OptimizerSpec(
    make=lambda learning_rate, task: oso.lbfgs(learning_rate, linesearch=None, same_batch_pairs=True),
    learning_rates=(0.3, 0.1, 0.03),
    description="oso.lbfgs in its stochastic mode: memory 10, fixed learning rate, pairs on the same minibatch "
    "(one extra gradient per step)",
)
