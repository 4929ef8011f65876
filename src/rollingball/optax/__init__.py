"""RBO, the Rolling Ball Optimizer, as an optax gradient transformation (JAX; torch not needed).

    tx = rbo(learning_rate=0.1, radius=1.0)
    updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)

The same step as `rollingball.RBO`, decision for decision (docs/algorithm.md): with the landscape
f = κ(loss + λ/2 ‖θ‖²) and g = ∇f at θ,

    s = √(1 + ‖g‖²),  v = g or v ← μ v + g,
    θ̃ = θ − ρ g/s − η v,  ỹ = f + ρ/s − η ⟨g, v⟩,
    θ ← argmin_x φ(x),  φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)²,

the projection run by the same solvers ("anderson" or "gd") inside `jax.lax.while_loop`, each
evaluation of f being one call of `value_fn(x, **extra_args)` (forward and backward).
`radius=0` is exactly `optax.sgd`. Scalars (norms, inner products, φ) are accumulated in
float32 or the widest parameter dtype, whichever is wider.

The package: `_state` (RBOState, STALLS), `_tree` (pytree arithmetic), `_projection` (the gd
and Anderson solvers), `_transform` (`rbo` and its step).
"""

from rollingball.optax._state import STALLS, RBOState
from rollingball.optax._transform import rbo

__all__ = ["STALLS", "RBOState", "rbo"]
