"""Layer 3: ready optimizers, thin ``optax.chain``s of a ``scale_by_*`` with weight decay and the learning rate."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from optax_second_order.curvature.capture import Layers
from optax_second_order.transforms import diagonal
from optax_second_order.transforms import kbfgs as _kbfgs
from optax_second_order.transforms import kfac as _kfac
from optax_second_order.transforms import newton as _newton
from optax_second_order.transforms import quasi_newton as _quasi_newton
from optax_second_order.transforms import shampoo as _shampoo
from optax_second_order.transforms import soap as _soap
from optax_second_order.transforms.common import check, check_choice

__all__: list[str] = ["shampoo", "soap", "kfac", "adagrad", "adam", "adahessian", "sophia"]
__all__ += ["bfgs", "dfp", "sr1", "lbfgs", "kbfgs"]  # quasi-Newton, K-BFGS


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
    learning_rate: optax.ScalarOrSchedule,
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
    the official ``SophiaG`` class's (betas (0.965, 0.99), rho 0.04, weight decay 0.1, eps 1e-15, k = 10).
    The learning rate has no default, as in optax's aliases: take about a tenth of the one you would use for
    Adam / AdamW (measured: the best of ``3e-2 .. 1e-4`` was ``1e-3`` where Adam's best was ``1e-2`` or
    ``3e-2``, on the benchmark's digits MLP and CNN; the official GPT-2 setting, 1e-4 against AdamW's 6e-4,
    and the best ``3e-4 .. 1e-3`` on a held-out character LM agree). Sophia-G needs ``model_fn`` and ``loss``;
    Sophia-H needs ``value_fn``. See :func:`optax_second_order.scale_by_sophia`.
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


def _momentum(b1: Any, nesterov: bool, state_dtype: Any) -> optax.GradientTransformation:
    """``optax.trace(b1, nesterov)``, with its accumulator stored in ``state_dtype`` when one is given (computed in the
    updates' dtype: the stored momentum is cast up before ``g + b1 m``, so a traced ``b1`` under
    ``optax.inject_hyperparams`` gives the same numbers as a Python float)."""
    if state_dtype is None:
        return optax.trace(decay=b1, nesterov=nesterov)
    dtype = jnp.dtype(state_dtype)

    def init_fn(params):
        return optax.TraceState(trace=jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype), params))

    def update_fn(updates, state, params=None):
        del params
        new = jax.tree.map(lambda g, m: g + b1 * m.astype(g.dtype), updates, state.trace)
        out = jax.tree.map(lambda g, m: g + b1 * m, updates, new) if nesterov else new
        return out, optax.TraceState(trace=jax.tree.map(lambda m: m.astype(dtype), new))

    return optax.GradientTransformation(init_fn, update_fn)


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
    layer_axes: Any = None,
    state_dtype: Any = None,
    quantize: Any = None,
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
            layer_axes=layer_axes,
            state_dtype=state_dtype,
            quantize=quantize,
        ),
        _momentum(b1, nesterov, state_dtype),
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
    precondition_sharding: NamedSharding | None = None,
    layer_axes: Any = None,
    state_dtype: Any = None,
    quantize: Any = None,
    one_sided: bool | int = False,
    factorized_second_moment: bool = False,
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
            precondition_sharding=precondition_sharding,
            layer_axes=layer_axes,
            state_dtype=state_dtype,
            quantize=quantize,
            one_sided=one_sided,
            factorized_second_moment=factorized_second_moment,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# --- K-FAC (transforms/kfac.py) -----------------------------------------------------------------


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    layers: Layers,
    *,
    damping: float = 0.1,
    damping_mode: str = "factored",
    approximation: str = "kronecker",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    kl_clip: float | None = 1e-2,
    ema_decay: float = 0.95,
    statistics_frequency: int = 10,
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
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC: KL-clipped natural gradient, heavy-ball ``momentum`` on it, decoupled ``weight_decay``.

    ``chain(scale_by_kfac, trace(momentum), add_decayed_weights(weight_decay), scale_by_learning_rate)``;
    ``layers`` from ``oso.kronecker.find_layers`` or ``oso.flax.find_layers``; ``update`` needs
    ``model_fn`` and ``loss`` (and ``value_fn`` with ``adaptive_damping``);
    ``approximation="eigenvalue_corrected"`` gives EK-FAC. With ``adaptive_learning_rate`` (and ``kl_clip=None``)
    the step size comes from the quadratic model and ``learning_rate`` multiplies it (use 1.0); with
    ``adaptive_momentum`` the momentum does too, and ``momentum`` is not used (Martens & Grosse 2015, section 7:
    the configuration K-FAC-JAX enables by default, together with ``adaptive_damping``). ``state_dtype`` stores the
    momentum in that dtype too (as :func:`shampoo`'s). See :func:`~optax_second_order.scale_by_kfac` for the other
    arguments.
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
            state_dtype=state_dtype,
        ),
        *([] if adaptive_momentum else [_momentum(momentum, False, state_dtype)]),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


# --- the solve-based family (transforms/newton.py) ----------------------------------------------
# Each method chooses its own step, so learning_rate=1.0 is the one to use; it stays a (schedulable) argument so that
# the step composes with optax schedules, and the reduction-ratio test and CG-backtracking test the step scaled by it.

__all__ += ["newton", "newton_cg", "gauss_newton", "levenberg_marquardt", "hessian_free", "natural_gradient"]

_NATURAL_GRADIENT_FISHER = {"true": "fisher", "exact": "gauss_newton", "empirical": "empirical_fisher"}


def newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 0.0,
    *,
    saddle_free: bool = False,
    damping_rule: str = "fixed",
    damping_decrease: float | None = None,
    damping_increase: float | None = None,
    min_damping: float = 1e-8,
    accept_threshold: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Damped Newton with the dense Hessian: ``params <- params - lr (H + damping I)^{-1} g``. Use ``learning_rate=1``.

    For small models (the ``n x n`` Hessian is built from ``n`` products and factored). An indefinite ``H + damping I``
    gets the damping ``damping + 2 |lambda_min|`` (a Hessian modification on the Hessian's own scale, Nocedal & Wright
    2006, section 3.4);
    ``saddle_free=True`` uses ``|H|`` instead (Dauphin et al. 2014). ``damping_rule="levenberg_marquardt"`` or
    ``"trust_region"`` adapts the damping from the reduction ratio and rejects bad steps (``damping`` is then the
    initial value). ``update`` needs ``value_fn``. See :func:`~optax_second_order.scale_by_newton`.
    """
    _check_alias("newton", learning_rate)
    return optax.chain(
        _newton.scale_by_newton(
            "hessian",
            "dense",
            damping=damping,
            damping_rule=damping_rule,
            damping_decrease=damping_decrease,
            damping_increase=damping_increase,
            min_damping=min_damping,
            accept_threshold=accept_threshold,
            saddle_free=saddle_free,
            learning_rate=learning_rate,
            name="newton",
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def newton_cg(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    damping_rule: str = "levenberg_marquardt",
    damping_decrease: float | None = None,
    damping_increase: float | None = None,
    min_damping: float = 1e-8,
    accept_threshold: float | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Newton-CG (truncated Newton): CG on ``(H + damping I) x = g`` by Hessian-vector products, stopped at the first
    direction of non-positive curvature (Nocedal & Wright 2006, Algorithm 7.1). Use ``learning_rate=1``.

    By default the damping (initially ``damping``) is adapted by the Levenberg-Marquardt rule from the reduction
    ratio, and steps with ``rho <= 0`` are rejected (``damping_rule="trust_region"``: Nocedal & Wright's radius rule,
    accepting ``rho > 0.15``; ``"fixed"``: no test, ``damping`` throughout). ``tol=None`` is the forcing term
    ``min(0.5, sqrt(||g||))``; ``maxiter`` defaults to 250. ``update`` needs ``value_fn``. See
    :func:`~optax_second_order.scale_by_newton`.
    """
    _check_alias("newton_cg", learning_rate)
    return optax.chain(
        _newton.scale_by_newton(
            "hessian",
            "cg",
            damping=damping,
            damping_rule=damping_rule,
            damping_decrease=damping_decrease,
            damping_increase=damping_increase,
            min_damping=min_damping,
            accept_threshold=accept_threshold,
            tol=tol,
            maxiter=maxiter,
            learning_rate=learning_rate,
            name="newton_cg",
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def gauss_newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1e-3,
    *,
    solver: str = "cg",
    tol: float | None = None,
    maxiter: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Damped (generalized) Gauss-Newton: ``params <- params - lr (J^T H_L J + damping I)^{-1} g``, fixed damping.

    ``solver``: ``"cg"`` (products only), ``"dense"`` (small models) or ``"row_space"`` (exact for a batch with fewer
    outputs than parameters: an ``m x m`` system, ``m`` = the number of output coordinates). Use ``learning_rate=1``.
    ``update`` needs ``model_fn`` and ``loss``. See :func:`~optax_second_order.scale_by_newton`.
    """
    _check_alias("gauss_newton", learning_rate)
    return optax.chain(
        _newton.scale_by_newton(
            "gauss_newton", solver, damping=damping, tol=tol, maxiter=maxiter, learning_rate=learning_rate,
            name="gauss_newton",
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def levenberg_marquardt(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    solver: str = "cg",
    damping_decrease: float = 2.0 / 3.0,
    damping_increase: float = 1.5,
    min_damping: float = 1e-8,
    tol: float | None = None,
    maxiter: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt: Gauss-Newton with the damping adapted from the reduction ratio ``rho`` and steps with
    ``rho <= 0`` rejected (zero update, larger damping). Use ``learning_rate=1``.

    ``damping`` is the initial value; ``rho > 3/4`` multiplies it by ``damping_decrease``, ``rho < 1/4`` by
    ``damping_increase`` (Martens 2010's constants), never below ``min_damping``. ``update`` needs ``value_fn``,
    ``model_fn`` and ``loss``. See :func:`~optax_second_order.scale_by_newton`.
    """
    _check_alias("levenberg_marquardt", learning_rate)
    return optax.chain(
        _newton.scale_by_newton(
            "gauss_newton",
            solver,
            damping=damping,
            damping_rule="levenberg_marquardt",
            damping_decrease=damping_decrease,
            damping_increase=damping_increase,
            min_damping=min_damping,
            tol=tol,
            maxiter=maxiter,
            learning_rate=learning_rate,
            name="levenberg_marquardt",
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    maxiter: int | None = None,
    progress_eps: float = 5e-4,
    warm_start_decay: float = 0.95,
    preconditioner: str | None = "empirical_fisher",
    preconditioner_exponent: float = 0.75,
    backtracking: bool = True,
    damping_decrease: float = 2.0 / 3.0,
    damping_increase: float = 1.5,
    min_damping: float = 1e-8,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free optimization (Martens 2010). Use ``learning_rate=1``.

    GGN + truncated CG with Martens' relative-progress stop (``progress_eps``, at most ``maxiter`` = 250 iterations),
    warm-started from the previous solution times ``warm_start_decay``, preconditioned by
    ``(diag(F_emp) + damping)^-preconditioner_exponent`` (``"empirical_fisher"`` from per-example gradients,
    ``N x #params`` memory; ``"empirical_fisher_estimate"`` from random signs, one ``vjp``; ``None``), with
    CG-backtracking over the iterates saved at ``ceil(1.3^j)`` (``backtracking``) and Levenberg-Marquardt damping
    (``damping`` the initial value; steps with ``rho <= 0`` rejected). ``update`` needs ``value_fn``, ``model_fn``
    and ``loss``. ``maxiter`` sizes the saved iterates: under ``optax.inject_hyperparams`` pass it in ``static_args``.
    See :func:`~optax_second_order.scale_by_newton`.
    """
    _check_alias("hessian_free", learning_rate)
    return optax.chain(
        _newton.scale_by_newton(
            "gauss_newton",
            "cg",
            damping=damping,
            damping_rule="levenberg_marquardt",
            damping_decrease=damping_decrease,
            damping_increase=damping_increase,
            min_damping=min_damping,
            tol=0.0,
            maxiter=maxiter,
            preconditioner=preconditioner,
            preconditioner_exponent=preconditioner_exponent,
            progress_eps=progress_eps,
            backtracking=1.3 if backtracking else None,
            warm_start_decay=warm_start_decay,
            learning_rate=learning_rate,
            name="hessian_free",
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    kl_budget: float | None = 1e-3,
    damping: float = 1e-3,
    *,
    fisher: str = "exact",
    solver: str = "cg",
    tol: float | None = None,
    maxiter: int | None = None,
    kl_rtol: float | None = 0.05,
    kl_maxiter: int = 10,
    num_samples: int | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Natural gradient ``x = (F + damping I)^{-1} g`` with a step of ``kl_budget`` in KL divergence.

    The scale starts at the second-order ``eta = sqrt(2 kl_budget / g^T x)`` and is corrected on the KL the step
    ``-eta x`` realizes, ``loss.kl`` of the model's outputs on the batch before and after (``kl_rtol``, default
    0.05; at most ``kl_maxiter`` tries, one evaluation of ``model_fn`` each). The guarantee: that KL is never above
    ``(1 + kl_rtol) kl_budget`` (else the update is zero and ``state.rejected`` counts it) and within
    ``kl_rtol * kl_budget`` of the budget when the search converges; ``state.realized_kl`` reports it. It is the KL of
    the step at ``learning_rate=1``, the value to use (a schedule scales the step after the search: KL about
    ``lr^2 kl_budget``). ``kl_rtol=None``: the second-order scale alone (off by third-order terms and the Fisher's
    error). ``kl_budget=None`` takes the plain step ``-lr x``.

    ``fisher``: ``"exact"`` (default; the GGN ``J^T H_L J``, which equals the Fisher for the library's losses, with
    no sampling), ``"true"`` (targets sampled from the model, ``num_samples`` per example, default 1: a low-rank
    estimate whose second-order step realized 30-180x the budget on small classifiers) or ``"empirical"`` (the data's
    targets). ``update`` needs ``model_fn`` and ``loss``. See :func:`~optax_second_order.scale_by_newton` and
    docs/optimizers/natural_gradient.md for the measurements.
    """
    _check_alias("natural_gradient", learning_rate)
    check_choice("natural_gradient", "fisher", fisher, tuple(_NATURAL_GRADIENT_FISHER))
    return optax.chain(
        _newton.scale_by_newton(
            _NATURAL_GRADIENT_FISHER[fisher],
            solver,
            damping=damping,
            tol=tol,
            maxiter=maxiter,
            kl_budget=kl_budget,
            kl_rtol=None if kl_budget is None else kl_rtol,
            kl_maxiter=kl_maxiter,
            num_samples=num_samples,
            learning_rate=learning_rate,
            name="natural_gradient",
            seed=seed,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


# --- quasi-Newton (transforms/quasi_newton.py) --------------------------------------------------


def _quasi_newton_chain(
    name: str,
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    linesearch,
    max_linesearch_steps,
    slope_rtol,
    curv_rtol,
) -> optax.GradientTransformationExtraArgs:
    """``chain(direction, scale(-1), linesearch)`` (``optax.lbfgs``'s composition), the accepted step times
    ``learning_rate``; without a line search ``chain(direction, scale_by_learning_rate(learning_rate))``."""
    _check_alias(name, learning_rate)
    if linesearch is None:
        return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))
    return optax.chain(
        direction,
        optax.scale(-1.0),
        _quasi_newton.scale_by_linesearch(
            linesearch,
            learning_rate,
            max_linesearch_steps=max_linesearch_steps,
            slope_rtol=slope_rtol,
            curv_rtol=curv_rtol,
            name=name,
        ),
    )


def bfgs(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    linesearch: str | optax.GradientTransformation | None = "more_thuente",
    max_linesearch_steps: int = 20,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    cholesky: bool = False,
    damp: bool = False,
    min_cosine: float = 1e-8,
    same_batch_pairs: bool = False,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """BFGS with a line search (dense, over the flattened parameters: up to a few thousand of them).

    ``cholesky=False`` updates ``H = B^{-1}`` (N&W eq. 6.17); ``cholesky=True`` updates the Cholesky factor of
    ``B`` (Dennis & Schnabel section 9.2). ``linesearch`` is ``"more_thuente"`` (strong Wolfe, Moré & Thuente 1994,
    MINPACK-2's ``dcsrch`` as in scipy: the default, fewer evaluations than ``"zoom"`` on every problem of the
    quasi-Newton benchmark), ``"zoom"`` (strong Wolfe, optax's), ``"backtracking"`` (Armijo), an optax line search,
    or ``None`` for a fixed ``learning_rate`` (the stochastic
    mode, with ``same_batch_pairs=True`` on minibatches). With a line search ``update`` needs ``value_fn``
    (and uses ``value`` and ``grad`` when given). See :func:`~optax_second_order.scale_by_quasi_newton` and
    :func:`~optax_second_order.scale_by_linesearch`.
    """
    return _quasi_newton_chain(
        "bfgs",
        _quasi_newton.scale_by_quasi_newton(
            "bfgs_cholesky" if cholesky else "bfgs",
            min_cosine=min_cosine,
            damp=damp,
            same_batch_pairs=same_batch_pairs,
            max_precond_dim=max_precond_dim,
        ),
        learning_rate, linesearch, max_linesearch_steps, slope_rtol, curv_rtol,
    )


def dfp(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    linesearch: str | optax.GradientTransformation | None = "zoom",
    max_linesearch_steps: int = 20,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    damp: bool = False,
    min_cosine: float = 1e-8,
    same_batch_pairs: bool = False,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """DFP on ``H`` (N&W eq. 6.15) with a line search; dense, as :func:`bfgs`, whose arguments it shares."""
    return _quasi_newton_chain(
        "dfp",
        _quasi_newton.scale_by_quasi_newton(
            "dfp", min_cosine=min_cosine, damp=damp, same_batch_pairs=same_batch_pairs, max_precond_dim=max_precond_dim
        ),
        learning_rate, linesearch, max_linesearch_steps, slope_rtol, curv_rtol,
    )


def sr1(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    linesearch: str | optax.GradientTransformation | None = "zoom",
    max_linesearch_steps: int = 20,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    inverse: bool = False,
    min_cosine: float = 1e-8,
    same_batch_pairs: bool = False,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SR1 with a line search: on ``B`` with a solve per step (``inverse=False``, N&W eq. 6.24) or on ``H``
    (``inverse=True``, eq. 6.25). ``B`` may be indefinite: a direction that does not descend is replaced by the
    scaled gradient and counted (``fallbacks`` in the state). Otherwise as :func:`bfgs`."""
    return _quasi_newton_chain(
        "sr1",
        _quasi_newton.scale_by_quasi_newton(
            "sr1_inverse" if inverse else "sr1",
            min_cosine=min_cosine,
            same_batch_pairs=same_batch_pairs,
            max_precond_dim=max_precond_dim,
        ),
        learning_rate, linesearch, max_linesearch_steps, slope_rtol, curv_rtol,
    )


def lbfgs(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    memory_size: int | None = None,
    linesearch: str | optax.GradientTransformation | None = "zoom",
    max_linesearch_steps: int = 20,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    min_cosine: float = 1e-8,
    same_batch_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """L-BFGS (memory ``m``, default 10) with a line search: ``optax.lbfgs``'s composition with this library's
    :func:`~optax_second_order.scale_by_lbfgs` (pairs that fail the curvature test are skipped, non-finite
    gradients never stored). ``linesearch=None`` with ``same_batch_pairs=True`` is the stochastic mode: a fixed
    ``learning_rate`` and one extra gradient of ``value_fn`` per step. The default line search is ``"zoom"``:
    ``"more_thuente"`` repeats scipy's L-BFGS-B iteration for iteration on Rosenbrock (75 iterations / 93
    evaluations against zoom's 83 / 102 on Rosenbrock-10) but takes more evaluations than zoom on two of the
    benchmark's five problems (docs/benchmark.md). Otherwise as :func:`bfgs`."""
    return _quasi_newton_chain(
        "lbfgs",
        _quasi_newton.scale_by_lbfgs(memory_size, min_cosine=min_cosine, same_batch_pairs=same_batch_pairs),
        learning_rate, linesearch, max_linesearch_steps, slope_rtol, curv_rtol,
    )


# --- K-BFGS (transforms/kbfgs.py) -------------------------------------------------------------


def kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    layers: Layers,
    *,
    damping: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    ema_decay: float = 0.9,
    pair_decay: float = 0.9,
    limited_memory: bool = False,
    memory_size: int | None = None,
    statistics_frequency: int = 1,
    min_cosine: float = 1e-8,
    precondition_sharding: NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
    """K-BFGS, or K-BFGS(L) with ``limited_memory=True`` (Goldfarb, Ren & Bahamou 2020).

    ``chain(add_decayed_weights(weight_decay), scale_by_kbfgs, scale_by_learning_rate)``: the weight decay is
    the paper's L2 term (``tau = 1e-5`` there), added to the gradient before the momentum. ``layers`` from
    ``oso.kronecker.find_layers`` or ``oso.flax.find_layers``; ``update`` needs ``model_fn`` and ``loss``.
    The authors' defaults: ``learning_rate = 0.3``, ``damping = 0.3``. See
    :func:`~optax_second_order.scale_by_kbfgs` for the other arguments.
    """
    _check_alias("kbfgs", learning_rate, weight_decay, momentum)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        _kbfgs.scale_by_kbfgs(
            layers,
            learning_rate=learning_rate,
            damping=damping,
            momentum=momentum,
            ema_decay=ema_decay,
            pair_decay=pair_decay,
            limited_memory=limited_memory,
            memory_size=memory_size,
            statistics_frequency=statistics_frequency,
            min_cosine=min_cosine,
            precondition_sharding=precondition_sharding,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
