"""Shared pieces of every transformation: extra arguments, hyperparameter checks, finite guards, amortization.

Extra arguments (passed as ``tx.update(grads, state, params, **extra)``; ``optax.chain`` hands the
same keywords to every child, so every transformation uses the same names):

* ``value_fn``: params -> scalar loss on the current batch (the name ``optax.lbfgs`` uses);
* ``model_fn``: params -> model outputs (logits, predictions) on the current batch;
* ``loss``: an output-space loss from :mod:`optax_second_order.curvature.losses`, bound to the
  batch's targets;
* ``hvp_fn``: ``v -> H v``, the Hessian of ``value_fn`` at ``params`` (from ``oso.grad_and_hvp_fn``, the training
  step's own linearization); Hutchinson estimators use it instead of differentiating ``value_fn`` again;
* ``full_params``: the whole parameter tree, needed only inside ``optax.masked`` / ``multi_transform`` /
  ``partition``, which hand the inner transformation the *masked* params while ``value_fn`` and ``model_fn``
  are functions of the whole tree (:func:`masked_extras`).

Hyperparameters. ``optax.inject_hyperparams(alias)`` calls the alias with every numeric argument (defaults
included) as an array, traced inside ``update``; so a hyperparameter is checked only when it is a concrete
Python number (:func:`check`), and no code branches in Python on its value. Structural integers (block sizes,
memory sizes) cannot be traced: they default to ``None`` (resolved inside, so ``inject_hyperparams`` leaves them
alone) and :func:`static_int` says what to do when one arrives as an array.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    "EXTRA_ARGS",
    "extra_arg",
    "require_params",
    "require_loss",
    "scalar_value_fn",
    "check",
    "check_choice",
    "static_int",
    "stat_dtype",
    "tree_stat_dtype",
    "layer_axes",
    "layers_first",
    "layers_back",
    "is_refresh_step",
    "stagger_slots",
    "computed_once",
    "all_finite",
    "keep_if_nonfinite",
    "finite_ema",
    "discard_nonfinite",
    "discard_nonfinite_matrices",
    "gram_update_finite",
    "value_at",
    "is_masked",
    "has_masked_leaves",
    "MaskedView",
    "masked_view",
    "masked_extras",
    "update_on_whole_tree",
    "check_float_leaves",
    "inner_state",
]

PyTree = Any

EXTRA_ARGS = {
    "value_fn": "params -> scalar loss on the current batch",
    "model_fn": "params -> model outputs (logits, predictions) on the current batch",
    "loss": "an output-space loss from optax_second_order.losses bound to the batch's targets",
    "full_params": "the whole parameter tree, when the transformation runs inside optax.masked / multi_transform",
    "hvp_fn": "v -> H v, the Hessian of value_fn at params applied to a params-like v (from oso.grad_and_hvp_fn); "
    "Hutchinson estimators use it instead of differentiating value_fn again",
}


# --- extra arguments -------------------------------------------------------------------------------


def extra_arg(extra: dict[str, Any], name: str, transform: str) -> Any:
    """The extra argument ``name`` from ``extra``, or a ``TypeError`` naming the transform and argument."""
    value = extra.get(name)
    if value is None:
        meaning = EXTRA_ARGS.get(name, "")
        raise TypeError(
            f"{transform}: update() needs the extra argument `{name}` ({meaning}); call "
            f"tx.update(grads, state, params, {name}=...)"
        )
    if name == "loss":
        return require_loss(value, transform)
    if name == "value_fn":
        return scalar_value_fn(value, transform)
    return value


def require_params(params: Any, transform: str) -> Any:
    """``params``, or a ``TypeError`` saying that ``transform`` needs them."""
    if params is None:
        raise TypeError(f"{transform}: update() needs `params` (call tx.update(grads, state, params, ...))")
    return params


def require_loss(loss: Any, transform: str) -> OutputLoss:
    """``loss`` if it is an output-space loss, else a ``TypeError`` that says how to build one."""
    if not isinstance(loss, OutputLoss):
        raise TypeError(
            f"{transform}: the extra argument `loss` must be an output-space loss bound to the batch's targets, "
            f"such as oso.losses.softmax_cross_entropy(labels), sigmoid_binary_cross_entropy(targets) or "
            f"squared_error(targets); got {type(loss).__name__}"
        )
    return loss


def scalar_value_fn(value_fn: Callable, transform: str) -> Callable:
    """``value_fn`` wrapped so that a non-scalar result raises a ``ValueError`` naming ``transform`` (at trace time)."""

    def checked(params):
        value = value_fn(params)
        if jnp.ndim(value) != 0:
            raise ValueError(
                f"{transform}: value_fn must return the batch's scalar loss, got shape {jnp.shape(value)} "
                "(reduce it, e.g. with .mean())"
            )
        return value

    return checked


# --- hyperparameters -------------------------------------------------------------------------------


def _is_python_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(transform: str, name: str, value: Any, ok: Callable[[Any], bool], requirement: str) -> None:
    """``ValueError("{transform}: {name} must be {requirement}, got {value}")`` if ``value`` is a concrete Python
    number that fails ``ok``; ``None``, arrays and traced values pass (they are checked by their users, or not)."""
    if _is_python_number(value) and not ok(value):
        raise ValueError(f"{transform}: {name} must be {requirement}, got {value!r}")


def check_choice(transform: str, name: str, value: Any, choices: tuple) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{transform}: {name} must be one of {choices}, got {value!r}")


def static_int(transform: str, name: str, value: Any, default: int, minimum: int = 1) -> int:
    """A structural integer (a shape or a memory size): ``default`` for ``None``, else a Python int ``>= minimum``.

    An array (as ``optax.inject_hyperparams`` passes numbers) is accepted when concrete; a traced one raises a
    ``TypeError`` that says to pass the argument in ``static_args``.
    """
    if value is None:
        return default
    try:
        number = float(value)
    except jax.errors.JAXTypeError as error:  # a tracer: its value is not known while tracing
        raise TypeError(
            f"{transform}: {name} sets array shapes and cannot be a traced value; with optax.inject_hyperparams "
            f"pass static_args=({name!r},)"
        ) from error
    if isinstance(value, bool) or not number.is_integer() or number < minimum:
        raise ValueError(f"{transform}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def value_at(value: Any, count: jax.Array) -> Any:
    """A hyperparameter's value at step ``count``: ``value(count)`` for a schedule, else ``value``."""
    return value(count) if callable(value) else value


# --- dtypes and amortization -----------------------------------------------------------------------


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are kept in: float32 or better, whatever the parameter dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def tree_stat_dtype(leaves: Sequence[Any]) -> jnp.dtype:
    """One dtype for statistics shared by several leaves (a factor bank's stacks): :func:`stat_dtype` of them all,
    promoted together."""
    return functools.reduce(jnp.promote_types, [stat_dtype(x.dtype) for x in leaves], jnp.float32)


def _is_axes(x: Any) -> bool:
    return x is None or isinstance(x, (tuple, int))


def layer_axes(transform: str, spec: Any, tree: PyTree) -> list[tuple[int, ...]]:
    """Per leaf of ``tree`` (``jax.tree.leaves`` order) the axes that stack independent layers (scanned layers' leading
    axis), from ``spec``: ``None`` (no leaf is stacked), or a pytree prefix of ``tree`` whose leaves are ``None``, an
    axis or a tuple of axes, or a callable ``tree -> such a pytree`` (as optax's Muon takes its dimension numbers).
    Negative axes count from the end; a ``ValueError`` names a leaf whose axes do not fit it."""
    leaves = jax.tree.leaves(tree)
    if spec is None:
        return [()] * len(leaves)
    spec = spec(tree) if callable(spec) else spec
    full = jax.tree.leaves(jax.tree.broadcast(spec, tree, is_leaf=_is_axes), is_leaf=_is_axes)
    out = []
    for axes, x in zip(full, leaves):
        axes = () if axes is None else (axes,) if isinstance(axes, int) else tuple(axes)
        ndim = jnp.ndim(x)
        if any(not -ndim <= a < ndim for a in axes) or len(set(a % max(ndim, 1) for a in axes)) < len(axes):
            raise ValueError(f"{transform}: layer_axes {axes} do not fit a leaf of shape {jnp.shape(x)}")
        out.append(tuple(sorted(a % ndim for a in axes)))
    return out


def layers_first(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` with its layer ``axes`` moved to the front and merged: ``[layers, *other axes]`` (a no-op for none)."""
    moved = jnp.moveaxis(x, axes, tuple(range(len(axes))))
    return moved.reshape(math.prod(moved.shape[:len(axes)]), *moved.shape[len(axes):])


def layers_back(y: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`layers_first` for a leaf of ``shape``."""
    stacked = tuple(shape[a] for a in axes)
    others = tuple(d for i, d in enumerate(shape) if i not in axes)
    return jnp.moveaxis(y.reshape(*stacked, *others), tuple(range(len(axes))), axes)


def is_refresh_step(count: jax.Array, every: Any, start: Any = 0) -> jax.Array:
    """True on steps ``start, start + every, ...`` (``count`` counts completed updates; ``every`` may be traced)."""
    return (count >= start) & ((count - start) % every == 0)


def stagger_slots(transform: str, stagger: Any, precondition_frequency: Any) -> int:
    """The number of slots a refresh is spread over: 1 for ``None`` / ``False`` (all at once), ``precondition_frequency``
    for ``True`` (it must then be concrete: under ``optax.inject_hyperparams`` list it in ``static_args``), else
    ``stagger`` itself (a structural integer, :func:`static_int`)."""
    if stagger is None or stagger is False:
        return 1
    if stagger is True:
        return static_int(transform, "precondition_frequency", precondition_frequency, 1)
    return static_int(transform, "stagger", stagger, 1)


# --- non-finite numbers ----------------------------------------------------------------------------


def computed_once(x: jax.Array) -> jax.Array:
    """``x`` (any shape and dtype, bit for bit), computed in a kernel of its own before its consumers.

    For a scalar reduced over the whole tree (a non-finite check, a global norm, the KL clip's scale, the quadratic
    model's coefficients) that then scales or gates every leaf. XLA:CPU's fusion copies cheap scalar operations into
    each consumer's kernel, so without this every leaf's kernel recomputes the whole chain of per-leaf results (one
    ``and``, ``add`` or ``max`` a leaf): the program grows with leaves x leaves, and compile time, mostly the code
    generation of the kernels, with it. SOAP's update on ``stdlib-charlm`` had 27,083 instructions, 6,118 of them
    ``and``; with the checks computed once, 9,400 (docs/benchmark.md, "Compile"). ``jax.lax.optimization_barrier``
    does not do this on CPU (XLA removes it before fusion); a sort, which XLA never fuses into its consumers, does:
    ``x`` stacked with itself and sorted along the new axis is ``x`` again (two equal entries), at the cost of one
    tiny kernel.
    """
    return jax.lax.sort(jnp.stack([x, x]), dimension=0)[0]


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a scalar bool; True for a tree without such leaves)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return computed_once(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))) if leaves else jnp.asarray(True)


def keep_if_nonfinite(old: PyTree, new: PyTree) -> tuple[PyTree, jax.Array]:
    """``new`` if it is all finite, else ``old`` (leafwise ``jnp.where``); and ``1`` (int32) if ``new`` was not."""
    ok = all_finite(new)
    kept = jax.tree.map(lambda o, n: jnp.where(ok, n.astype(o.dtype), o), old, new)
    return kept, (~ok).astype(jnp.int32)


def finite_ema(old: PyTree, new: PyTree, decay: Any) -> tuple[PyTree, jax.Array]:
    """The moving average ``decay * old + (1 - decay) * new``, unless it is not finite: then ``old`` is kept.

    An ``old`` that is itself not finite (a state corrupted before it reached this transformation) is discarded:
    the average restarts from ``new``. Returns the average and ``1`` (int32) when ``new`` was discarded, for the
    state's non-finite counter.
    """
    old = discard_nonfinite(old, like=new)

    def average(o, n):
        return (decay * o + (1 - decay) * n.astype(o.dtype)).astype(o.dtype)

    return keep_if_nonfinite(old, jax.tree.map(average, old, new))


def discard_nonfinite(tree: PyTree, like: PyTree | None = None) -> PyTree:
    """``tree`` with every leaf that holds a non-finite number replaced by the same leaf of ``like`` (default zeros):
    a corrupt statistic restarts. (Stacks of matrices, one check per matrix: :func:`discard_nonfinite_matrices`.)"""
    like = jax.tree.map(jnp.zeros_like, tree) if like is None else like

    def clean(x, replacement):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        finite = jnp.all(jnp.isfinite(x))
        return jnp.where(finite, x, replacement.astype(x.dtype))

    return jax.tree.map(clean, tree, like)


def discard_nonfinite_matrices(stacks: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """``[n, d, d]`` stacks with every matrix that holds a non-finite number replaced by zeros (a corrupt factor
    restarts), and the largest ``|entry|`` of the matrices kept (0 if none).

    One reduction (``max |F|`` per matrix, NaN for a corrupt one: XLA's maximum propagates NaN) gives both; the
    replacement is elementwise and fuses into the factor's update.
    """
    largest = [jnp.max(jnp.abs(f), axis=(-2, -1), keepdims=True) for f in stacks]
    finite = [jnp.isfinite(m) for m in largest]
    cleaned = tuple(jnp.where(ok, f, jnp.zeros((), f.dtype)) for ok, f in zip(finite, stacks))
    kept = [jnp.max(jnp.where(ok, m, 0.0)) for ok, m in zip(finite, largest)]
    return cleaned, functools.reduce(jnp.maximum, kept, jnp.zeros((), jnp.float32))


def gram_update_finite(grads: PyTree, largest_factor: jax.Array, decay: Any, weight: Any, dtype: Any) -> jax.Array:
    """Whether every factor ``decay * F + weight * G_(i) G_(i)^T``, stored in ``dtype``, will be finite, decided
    before the products.

    Every entry of a mode Gram matrix of a block of ``G`` is at most ``||G||_F^2`` in magnitude (Cauchy-Schwarz:
    ``|sum_l a_l b_l| <= sqrt(sum a^2 sum b^2)``, for every partial sum too, and rounding adds a relative ``n u``),
    and ``|F| <= largest_factor``; so the Gram matrices and the new factors are finite when
    ``decay largest_factor + 2 max(weight, 1) ||G||^2`` is, in ``dtype`` (the factor 2 covers the rounding, and
    ``max(weight, 1)`` the Gram matrix itself, before it is weighted). It is false for a non-finite ``G`` and,
    conservatively, for one whose squared norm is within a factor 2 of overflowing.

    Checking the inputs instead of the new factors keeps the check off the products' critical path: the new
    factors' own ``all_finite`` made Shampoo's update on the autoencoder benchmark about 20 ms (30%) slower.
    """
    squared_norm = optax.tree.norm(grads, squared=True) if jax.tree.leaves(grads) else jnp.zeros(())
    bound = decay * largest_factor + 2.0 * jnp.maximum(weight, 1.0) * squared_norm
    return computed_once(jnp.isfinite(bound.astype(dtype)))


# --- devices ---------------------------------------------------------------------------------------


# --- masked parameter trees (optax.masked, multi_transform, partition) ----------------------------


def is_masked(x: Any) -> bool:
    """Whether ``x`` is an ``optax.MaskedNode``, the placeholder ``optax.masked`` puts where the mask is False."""
    return isinstance(x, optax.MaskedNode)


def has_masked_leaves(tree: PyTree) -> bool:
    return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


class MaskedView:
    """A masked tree (``optax.MaskedNode`` where the mask is False, possibly for whole subtrees) and the whole tree.

    ``embed(p)`` puts a masked-structured tree ``p`` into the whole one (the masked parts taken from
    ``fill``, by default the whole tree's own values); ``restrict(t)`` cuts a whole tree back to the masked
    structure. Both work under tracing; positions come from the masked tree's structure with ``MaskedNode``
    as a leaf, so a mask that is a prefix of the params (one ``False`` for a whole subtree) works too.
    """

    def __init__(self, template: PyTree, full: PyTree):
        self.treedef = jax.tree.structure(template, is_leaf=is_masked)
        self.masked = [is_masked(x) for x in self.treedef.flatten_up_to(template)]
        self.full = self.treedef.flatten_up_to(full)

    def embed(self, tree: PyTree, fill: list | None = None) -> PyTree:
        parts = self.treedef.flatten_up_to(tree)
        fill = self.full if fill is None else fill
        return self.treedef.unflatten([f if m else x for x, f, m in zip(parts, fill, self.masked)])

    def embed_zeros(self, tree: PyTree) -> PyTree:
        """``tree`` in the whole tree's structure with zeros (like the whole tree's parts) where masked."""
        return self.embed(tree, [jax.tree.map(jnp.zeros_like, f) for f in self.full])

    def restrict(self, tree: PyTree) -> PyTree:
        parts = self.treedef.flatten_up_to(tree)
        return self.treedef.unflatten([optax.MaskedNode() if m else x for x, m in zip(parts, self.masked)])


def masked_view(params: PyTree, extra: dict[str, Any], transform: str) -> MaskedView:
    """The :class:`MaskedView` of masked ``params`` and the extra argument ``full_params``, or a ``TypeError``."""
    full = extra.get("full_params")
    if full is None:
        raise TypeError(
            f"{transform}: inside optax.masked / multi_transform / partition the transformation sees masked params, "
            "but value_fn and model_fn take the whole tree: pass it as the extra argument `full_params` too, "
            "tx.update(grads, state, params, full_params=params, ...)"
        )
    return MaskedView(params, full)


def update_on_whole_tree(step: Callable, updates: PyTree, state: Any, params: PyTree, extra: dict[str, Any], transform: str):
    """``step(updates, state, params, **extra)``, run on the whole tree when ``params`` is masked.

    Inside ``optax.masked`` / ``multi_transform`` the step sees the whole parameters (``full_params``) with zero
    gradients where masked, so a state kept per layer covers every layer; the result is cut back to the masked
    structure. Unmasked ``params``: the step as it is.
    """
    if not has_masked_leaves(params):
        return step(updates, state, params, **extra)
    view = masked_view(params, extra, transform)
    direction, state = step(view.embed_zeros(updates), state, view.embed(params), **extra)
    return view.restrict(direction), state


def masked_extras(params: PyTree, extra: dict[str, Any], transform: str) -> dict[str, Any]:
    """``extra`` with ``value_fn``, ``model_fn`` and ``hvp_fn`` restricted to the visible leaves when ``params`` is
    masked.

    ``value_fn(p)`` becomes ``value_fn(embed(p))`` with the masked leaves held at their values in
    ``full_params``: curvature is then taken with respect to the leaves the mask lets through, at the whole
    parameters. Unmasked ``params``: ``extra`` unchanged. Masked ``params`` without ``full_params``: those functions
    raise the ``TypeError`` asking for it when called, so a transformation that calls none of them (Adam, Adagrad)
    runs inside ``optax.masked`` as optax's own do.
    """
    if params is None or not has_masked_leaves(params):
        return extra
    if extra.get("full_params") is None:
        # Only a transformation that calls value_fn / model_fn / hvp_fn needs the whole tree (a diagonal
        # preconditioner such as Adam calls none): the TypeError asking for `full_params` comes at that call.
        def missing(*args, **kwargs):
            masked_view(params, extra, transform)

        return {**extra, **{name: missing for name in ("value_fn", "model_fn", "hvp_fn") if extra.get(name) is not None}}
    view = masked_view(params, extra, transform)
    out = dict(extra)
    for name in ("value_fn", "model_fn"):
        if extra.get(name) is not None:
            out[name] = (lambda fn: lambda p: fn(view.embed(p)))(extra[name])
    if extra.get("hvp_fn") is not None:  # H v with v zero on the masked leaves, cut to the visible ones
        out["hvp_fn"] = (lambda fn: lambda v: view.restrict(fn(view.embed_zeros(v))))(extra["hvp_fn"])
    return out


def check_float_leaves(tree: PyTree, transform: str) -> None:
    """A ``TypeError`` naming the first leaf of ``tree`` that is not floating point (a counter, or a ``float0``
    gradient of one): second-order statistics need floating-point parameters."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{transform}: leaf {jax.tree_util.keystr(path)} has dtype {dtype}; this transformation needs "
                "floating-point parameters. Keep integer state out of the optimized tree (nnx.Optimizer(..., "
                "wrt=nnx.Param)) or leave it out with optax.masked / optax.partition"
            )


def inner_state(state: Any, cls: type, transform: str) -> Any:
    """The one ``cls`` state (a NamedTuple) in ``state``: an alias's chained state, or the state itself."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]
    if len(found) != 1:
        raise ValueError(f"{transform}: expected one {cls.__name__} in the state, found {len(found)}")
    return found[0]
