"""Layer 3: ready optimizers, thin ``optax.chain``s of a ``scale_by_*`` with weight decay and the learning rate."""

from __future__ import annotations

import optax
from jax.sharding import NamedSharding

from optax_second_order.curvature.capture import Layers
from optax_second_order.transforms import diagonal
from optax_second_order.transforms import kfac as _kfac
from optax_second_order.transforms import shampoo as _shampoo
from optax_second_order.transforms import soap as _soap
from optax_second_order.transforms.common import check

__all__: list[str] = ["shampoo", "soap", "kfac", "adagrad", "adam", "adahessian", "sophia"]


def _check_alias(name: str, learning_rate, weight_decay=0.0, momentum=None, momentum_name: str = "momentum") -> None:
    """The checks every alias shares: a positive learning rate, a non-negative weight decay, momentum in [0, 1)."""
    check(name, "learning_rate", learning_rate, lambda x: x > 0, "> 0 (or a schedule)")
    check(name, "weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
    check(name, momentum_name, momentum, lambda x: 0 <= x < 1, "in [0, 1)")


# --- diagonal preconditioners (transforms/diagonal.py) -----------------------------------------


def adagrad(
    learning_rate: optax.ScalarOrSchedule, initial_accumulator_value: float = 0.1, eps: float = 1e-7
) -> optax.GradientTransformationExtraArgs:
    """Adagrad as a diagonal-Fisher preconditioner: ``g / sqrt(initial + sum g^2 + eps)``.

    Equals ``optax.adagrad`` (same arguments and defaults) step for step while gradients and their squares are
    finite; a step whose gradient or square is not (an overflow in float32) is rejected -- zero update, state
    kept -- where ``optax.adagrad``'s accumulator becomes ``inf`` and it never moves again.
    """
    _check_alias("adagrad", learning_rate)
    check("adagrad", "initial_accumulator_value", initial_accumulator_value, lambda x: x >= 0, ">= 0")
    check("adagrad", "eps", eps, lambda x: x >= 0, ">= 0")
    return optax.chain(
        diagonal.scale_by_diagonal_curvature(
            "squared_gradient",
            b1=0.0,
            averaging="sum",
            initial_curvature=initial_accumulator_value,
            eps=0.0,
            eps_root=eps,
            name="adagrad",
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Adam as a bias-corrected EMA of the diagonal empirical Fisher ``g * g``, square-rooted.

    Equals ``optax.adam`` (same arguments and defaults) step for step while gradients and their squares are
    finite; a step whose gradient or square is not (an overflow in float32) is rejected -- zero update, moments
    kept -- where ``optax.adam``'s second moment becomes ``inf`` and it never moves again.
    """
    _check_alias("adam", learning_rate)
    return optax.chain(
        diagonal.scale_by_diagonal_curvature(
            "squared_gradient", b1=b1, b2=b2, eps=eps, eps_root=eps_root, name="adam"
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def adahessian(
    learning_rate: optax.ScalarOrSchedule = 0.15,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    hessian_power: float = 1.0,
    statistics_frequency: int = 1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """AdaHessian (Yao et al. 2021) with decoupled weight decay: ``-lr * (u + weight_decay * params)``.

    Defaults are the official code's (lr 0.15, betas (0.9, 0.999), eps 1e-4, weight decay 0,
    Hessian power 1). Needs the extra argument ``value_fn``. See
    :func:`optax_second_order.scale_by_adahessian`.
    """
    _check_alias("adahessian", learning_rate, weight_decay)
    return optax.chain(
        diagonal.scale_by_adahessian(
            b1=b1, b2=b2, eps=eps, hessian_power=hessian_power, statistics_frequency=statistics_frequency, seed=seed
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def sophia(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    estimator: str = "gnb",
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    weight_decay: float = 0.1,
    eps: float = 1e-15,
    statistics_frequency: int = 10,
    bias_correction: str | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-G (``estimator="gnb"``) or Sophia-H (``"hutchinson"``) with decoupled weight decay.

    ``params <- params - lr * (clip(m / (rho * h + eps), 1) + weight_decay * params)``; defaults are
    the official ``SophiaG`` class's (lr 1e-4, betas (0.965, 0.99), rho 0.04, weight decay 0.1,
    eps 1e-15, k = 10). Sophia-G needs ``model_fn`` and ``loss``; Sophia-H needs ``value_fn``. See
    :func:`optax_second_order.scale_by_sophia`.
    """
    _check_alias("sophia", learning_rate, weight_decay)
    return optax.chain(
        diagonal.scale_by_sophia(
            estimator,
            b1=b1,
            b2=b2,
            rho=rho,
            eps=eps,
            statistics_frequency=statistics_frequency,
            bias_correction=bias_correction,
            seed=seed,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# --- Kronecker-factored matrix preconditioners (transforms/shampoo.py, transforms/soap.py) -----


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    b2: float = 1.0,
    eps: float = 1e-12,
    relative_eps: float = 1e-6,
    exponent_override: float | None = None,
    precondition_frequency: int = 10,
    start_preconditioning_step: int | None = None,
    statistics_frequency: int = 1,
    block_size: int | None = None,
    merge_dims: bool = True,
    max_precond_dim: int | None = None,
    grafting: str = "adam",
    graft_b2: float = 0.999,
    graft_eps: float = 1e-8,
    precondition_sharding: NamedSharding | None = None,
    root_method: str = "eigh",
    stagger: bool | int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Shampoo (Gupta et al. 2018; Anil et al. 2020) with momentum and decoupled weight decay.

    ``u = scale_by_shampoo(...)(g)`` (blocked, grafted; Adam grafting by default), then momentum
    ``m <- b1 m + u`` (Nesterov: ``u + b1 m``) scaled by ``1 - b1`` (SGD momentum with dampening ``1 - b1``, so
    the step keeps the graft's size), then ``params <- params - lr * (m + weight_decay * params)``. See
    :func:`optax_second_order.scale_by_shampoo` for the other arguments and their defaults.
    """
    _check_alias("shampoo", learning_rate, weight_decay, momentum=b1, momentum_name="b1")
    return optax.chain(
        _shampoo.scale_by_shampoo(
            b2=b2,
            eps=eps,
            relative_eps=relative_eps,
            exponent_override=exponent_override,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            statistics_frequency=statistics_frequency,
            block_size=block_size,
            merge_dims=merge_dims,
            max_precond_dim=max_precond_dim,
            grafting=grafting,
            graft_b2=graft_b2,
            graft_eps=graft_eps,
            precondition_sharding=precondition_sharding,
            root_method=root_method,
            stagger=stagger,
        ),
        optax.trace(decay=b1, nesterov=nesterov),
        optax.scale(1.0 - b1),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = None,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    basis_method: str = "qr",
    stagger: bool | int | None = None,
    block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors, decoupled weight decay.

    Defaults are the official code's (lr 3e-3, betas (0.95, 0.95), shampoo_beta = b2, eps 1e-8,
    weight decay 0.01, precondition frequency 10, max_precond_dim 10000). Weight decay is applied to
    the parameters before the step (optax's convention: ``-lr * (u + wd * params)``); the official code
    decays after the step, a difference of order ``lr^2 * wd``. See :func:`optax_second_order.scale_by_soap`.
    """
    _check_alias("soap", learning_rate, weight_decay)
    return optax.chain(
        _soap.scale_by_soap(
            b1=b1,
            b2=b2,
            shampoo_beta=shampoo_beta,
            eps=eps,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            basis_method=basis_method,
            stagger=stagger,
            block_size=block_size,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# --- K-FAC (transforms/kfac.py) -----------------------------------------------------------------


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    layers: Layers,
    *,
    damping: float = 1e-3,
    damping_mode: str = "factored",
    approximation: str = "kronecker",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    kl_clip: float | None = 1e-3,
    ema_decay: float = 0.95,
    statistics_frequency: int = 1,
    precondition_frequency: int = 10,
    fisher: str = "true",
    seed: int = 0,
    precondition_sharding: NamedSharding | None = None,
    adaptive_damping: bool = False,
    damping_adaptation_interval: int = 5,
    damping_adaptation_decay: float = 0.95,
    min_damping: float = 1e-8,
    adaptive_learning_rate: bool = False,
    adaptive_momentum: bool = False,
    stagger: bool | int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC: KL-clipped natural gradient, heavy-ball ``momentum`` on it, decoupled ``weight_decay``.

    ``chain(scale_by_kfac, trace(momentum), add_decayed_weights(weight_decay), scale_by_learning_rate)``;
    ``layers`` from ``oso.kronecker.find_layers`` or ``oso.flax.find_layers``; ``update`` needs
    ``model_fn`` and ``loss`` (and ``value_fn`` with ``adaptive_damping``);
    ``approximation="eigenvalue_corrected"`` gives EK-FAC. With ``adaptive_learning_rate`` (and ``kl_clip=None``)
    the step size comes from the quadratic model and ``learning_rate`` multiplies it (use 1.0); with
    ``adaptive_momentum`` the momentum does too, and ``momentum`` is not used (Martens & Grosse 2015, section 7:
    the configuration K-FAC-JAX enables by default, together with ``adaptive_damping``). See
    :func:`~optax_second_order.scale_by_kfac` for the other arguments.
    """
    _check_alias("kfac", learning_rate, weight_decay, momentum)
    return optax.chain(
        _kfac.scale_by_kfac(
            layers,
            damping=damping,
            damping_mode=damping_mode,
            approximation=approximation,
            ema_decay=ema_decay,
            statistics_frequency=statistics_frequency,
            precondition_frequency=precondition_frequency,
            kl_clip=kl_clip,
            learning_rate=learning_rate,
            fisher=fisher,
            seed=seed,
            precondition_sharding=precondition_sharding,
            adaptive_damping=adaptive_damping,
            damping_adaptation_interval=damping_adaptation_interval,
            damping_adaptation_decay=damping_adaptation_decay,
            min_damping=min_damping,
            adaptive_learning_rate=adaptive_learning_rate,
            adaptive_momentum=adaptive_momentum,
            stagger=stagger,
        ),
        *([] if adaptive_momentum else [optax.trace(momentum)]),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
