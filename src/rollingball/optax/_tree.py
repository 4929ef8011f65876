"""Pytree arithmetic: scalars accumulated in `acc` (float32, or the widest parameter dtype if
that is wider), leaves kept in their own dtype.

`optax.tree_utils.tree_vdot` is not used for ⟨a, b⟩: it sums in the leaves' dtype with a dot
product; here every product and sum is in `acc`, elementwise (no matmul: exact on any device).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def accumulator(tree: Any) -> Any:
    """float32, or the widest floating dtype among the leaves if that is wider."""
    return jnp.result_type(jnp.float32, *(leaf.dtype for leaf in jax.tree.leaves(tree)))


def inner(a: Any, b: Any, acc: Any) -> jax.Array:
    """⟨a, b⟩ = Σ_leaves Σ a·b, products and sums in `acc` (no matmul: exact on any device)."""
    terms = [
        jnp.sum(x.astype(acc) * y.astype(acc))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(terms, jnp.zeros((), acc))


def combine(*terms: tuple[Any, Any]) -> Any:
    """Σ_i c_i·t_i leaf by leaf, computed in float32 or wider and stored in the leaf's dtype."""
    coefficients = [c for c, _ in terms]
    trees = [t for _, t in terms]

    def leaf(*xs: jax.Array) -> jax.Array:
        wide = jnp.promote_types(xs[0].dtype, jnp.float32)
        total = sum(
            jnp.asarray(c, wide) * x.astype(wide) for c, x in zip(coefficients, xs, strict=True)
        )
        return jnp.asarray(total).astype(xs[0].dtype)

    return jax.tree.map(leaf, *trees)


# --- rings: a pytree whose leaves carry a leading axis of m slots ---


def ring_like(tree: Any, memory: int) -> Any:
    """m zero slots shaped like `tree`."""
    return jax.tree.map(lambda leaf: jnp.zeros((memory, *leaf.shape), leaf.dtype), tree)


def slot(ring: Any, j: jax.Array) -> Any:
    """Slot j of the ring."""
    return jax.tree.map(lambda stack: stack[j], ring)


def ring_put(ring: Any, head: jax.Array, tree: Any) -> Any:
    """The ring with slot `head` set to `tree`."""
    return jax.tree.map(lambda stack, leaf: stack.at[head].set(leaf), ring, tree)


def ring_inners(ring: Any, tree: Any, acc: Any) -> jax.Array:
    """[⟨slot_j, tree⟩ for every slot j of the ring], accumulated in `acc`."""
    terms = [
        jnp.sum(stack.astype(acc) * leaf.astype(acc)[None], axis=tuple(range(1, stack.ndim)))
        for stack, leaf in zip(jax.tree.leaves(ring), jax.tree.leaves(tree), strict=True)
    ]
    return sum(terms, jnp.zeros(jax.tree.leaves(ring)[0].shape[:1], acc))


def ring_sum(
    base: jax.Array, c: jax.Array, a: jax.Array, x: jax.Array, b: jax.Array, y: jax.Array
) -> jax.Array:
    """c·base + Σ_j a_j x_j + Σ_j b_j y_j over the ring's slots, in float32 or wider (one
    elementwise pass: the slots are summed one by one, not reduced over the ring's axis)."""
    wide = jnp.promote_types(base.dtype, jnp.float32)
    total = c.astype(wide) * base.astype(wide)
    for j in range(x.shape[0]):
        total = (
            total + a[j].astype(wide) * x[j].astype(wide) + b[j].astype(wide) * y[j].astype(wide)
        )
    return total.astype(base.dtype)
