"""The state of `rbo`: the momentum buffer, the step count and the last step's statistics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

STALLS = (None, "rejected", "stationary", "skipped")  # RBOState.stall indexes this


class RBOState(NamedTuple):
    """The momentum buffer, the step count and the last step's statistics.

    Read them with `optax.tree_utils.tree_get(state, name)`. `grad_evals` counts the calls
    of `value_fn` in the step plus the caller's own evaluation at θ; `residual` is
    ‖r(x)‖/‖r(θ)‖ at the last evaluated point of the projection; `blind_step` says whether
    the solver took a last step without evaluating it; `skipped` is set when a non-finite
    loss or gradient made the update zero; `update_bounded` when `max_update` shortened it;
    `moved` says whether the update is nonzero, and `stall` why not: an index into `STALLS`
    (0 None: it moved; 1 "rejected": every trial point raised φ; 2 "stationary": θ met the
    tolerance, e.g. r(θ) = 0; 3 "skipped"), the reasons `rollingball.RBO.last_stats["stall"]`
    gives.
    """

    count: jax.Array  # type: ignore[assignment]  # optax calls the step count `count`
    momentum: Any
    grad_evals: jax.Array
    projection_steps: jax.Array
    safeguard_steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    blind_step: jax.Array
    skipped: jax.Array
    update_bounded: jax.Array
    moved: jax.Array
    stall: jax.Array
