"""rollingball.optax.rbo: equal to the torch RBO, to the authors' scheme, and the exact identities.

Float64 runs enable x64 inside a context only (`jax.enable_x64`), so no other test sees it.
Models are tiny: most of the time here is XLA compiling the projection loops.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from optax.tree_utils import tree_get
from torch import nn

import rollingball
from rollingball import RBO
from rollingball.optax import STALLS, RBOState, rbo

STATS = (
    "grad_evals",
    "projection_steps",
    "safeguard_steps",
    "converged",
    "blind_step",
    "update_bounded",
    "moved",
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_defaults_are_the_torch_rbo_defaults():
    torch_defaults = inspect.signature(RBO).parameters
    for name, parameter in inspect.signature(rbo).parameters.items():
        torch_name = "lr" if name == "learning_rate" else name
        assert parameter.default == torch_defaults[torch_name].default, name


# --- the same float64 MLP and batch in both frameworks ---


def torch_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)
    return model, x, y


def mlp_loss(params, inputs, labels):
    hidden = jnp.tanh(inputs @ params["0.weight"].T + params["0.bias"])
    logits = hidden @ params["2.weight"].T + params["2.bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def run_torch(options: dict, steps: int) -> tuple[dict, list[dict]]:
    model, x, y = torch_mlp()
    opt = RBO(model.parameters(), **options)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    stats = []
    for _ in range(steps):
        opt.step(closure)
        stats.append({key: opt.last_stats[key] for key in (*STATS, "stall")})
    return {name: p.detach().numpy() for name, p in model.named_parameters()}, stats


def run_jax(options: dict, steps: int, jit: bool) -> tuple[dict, list[dict], int]:
    model, x, y = torch_mlp()
    params = {name: jnp.asarray(p.detach().numpy()) for name, p in model.named_parameters()}
    inputs, labels = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    options = dict(options)
    tx = rbo(learning_rate=options.pop("lr"), **options)
    state = tx.init(params)
    traces = [0]

    def train_step(params, state, inputs, labels):
        traces[0] += 1
        value, grad = jax.value_and_grad(mlp_loss)(params, inputs, labels)
        updates, state = tx.update(
            grad, state, params, value=value, grad=grad, value_fn=mlp_loss, inputs=inputs,
            labels=labels,
        )  # fmt: skip
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step) if jit else train_step
    stats = []
    for _ in range(steps):
        params, state = step(params, state, inputs, labels)
        stall = STALLS[int(tree_get(state, "stall"))]
        stats.append({key: tree_get(state, key).item() for key in STATS} | {"stall": stall})
    return params, stats, traces[0]


EQUALITY_CASES = {
    "gd": dict(lr=0.5, radius=0.3, projection="gd", projection_steps=5, projection_step_size=0.5),
    "default": dict(lr=0.5, radius=0.3),
    # a short budget: blind last steps and safeguard rejections both happen
    "momentum+decay": dict(
        lr=1.0, radius=1.0, projection_steps=4, momentum=0.9, weight_decay=1e-2, loss_scale=2.0
    ),
    # the update bounded: θ + (max_update/‖d‖) d on the steps whose d is longer
    "max_update": dict(lr=0.5, radius=0.3, momentum=0.9, max_update=0.2),
    "sgd+max_update": dict(lr=0.5, radius=0.0, momentum=0.9, max_update=0.2),
    # rejected first trial points: γ shrinks by interpolation, the budget grows by up to 2
    "rejections": dict(lr=8.0, radius=0.3, projection_steps=3),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(EQUALITY_CASES))
def test_equal_to_the_torch_rbo(x64, case, jit):
    options = EQUALITY_CASES[case]
    expected, expected_stats = run_torch(options, steps=10)
    params, stats, traces = run_jax(options, steps=10, jit=jit)
    for name, weight in expected.items():
        error = np.abs(np.asarray(params[name]) - weight).max() / np.abs(weight).max()
        assert error < 1e-12, (name, error)
    assert stats == expected_stats  # grad evals and every decision of the solver, step by step
    assert traces == (1 if jit else 10)  # a jitted training step is traced and compiled once
    if case == "momentum+decay":
        assert any(s["blind_step"] for s in stats) and any(s["safeguard_steps"] for s in stats)
    bounded = sum(s["update_bounded"] for s in stats)
    assert 1 <= bounded <= 9 if "max_update" in options else bounded == 0
    if case == "rejections":
        assert max(s["grad_evals"] for s in stats) == 1 + 3 + 2  # K = 3 and 2 added
    assert all(s["moved"] and s["stall"] is None for s in stats)


# --- the authors' scheme, re-implemented from DESIGN §2 the way their code runs it ---


def authors_update(loss_fn, theta, lr, radius, steps, gamma):
    """K steps of x ← x − γ r(x) from x = θ, r re-evaluated at every x (K + 1 evaluations)."""
    value, g = jax.value_and_grad(loss_fn)(theta)
    s = jnp.sqrt(1 + g @ g)
    target = theta - radius * g / s - lr * g
    height = value + radius / s - lr * (g @ g)
    x = theta
    for _ in range(steps):
        fx, gx = jax.value_and_grad(loss_fn)(x)
        x = x - gamma * ((x - target) + (fx - height) * gx)
    return x


def test_gd_mode_reproduces_the_authors_scheme_with_one_evaluation_less(x64):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    inputs, targets = jax.random.normal(keys[0], (64, 4)), jax.random.normal(keys[1], (64,))
    theta = jax.random.normal(keys[2], (40,)) * 0.5
    calls = [0]

    def loss_fn(flat):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        hidden = jnp.tanh(inputs @ flat[:32].reshape(4, 8))
        return jnp.mean((hidden @ flat[32:] - targets) ** 2)

    steps, gamma = 5, 0.1
    tx = rbo(
        0.1, 0.5, projection="gd", projection_steps=steps, projection_step_size=gamma,
        projection_tol=0,
    )  # fmt: skip

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
        return optax.apply_updates(params, updates), state

    reference = jax.jit(lambda p: authors_update(loss_fn, p, 0.1, 0.5, steps, gamma))
    params, state = theta, tx.init(theta)
    for _ in range(20):
        params, state = step(params, state)
        assert tree_get(state, "grad_evals") == steps
        theta = reference(theta)
    jax.effects_barrier()
    assert calls[0] == 20 * steps + 20 * (steps + 1)  # ours K per step, theirs K + 1
    np.testing.assert_allclose(params, theta, rtol=0, atol=1e-12)


# --- exact identities ---


def nested_params(dtype=jnp.float32):
    """A nested pytree (dict, tuple, list, a scalar leaf) drawn with NumPy: no compilation."""
    rng = np.random.default_rng(3)
    w, b, c, d = (rng.normal(size=shape) for shape in [(3, 2), (2,), (), (4,)])
    return {
        "dense": (jnp.asarray(w, dtype), jnp.asarray(b * 0, dtype)),
        "scale": [jnp.asarray(c, dtype), jnp.asarray(d, dtype)],
    }


def quartic(params):
    leaves = jax.tree.leaves(params)
    return sum(jnp.sum(jnp.cos(leaf.astype(jnp.float32)) + leaf.astype(jnp.float32) ** 4 / 4)
               for leaf in leaves)  # fmt: skip


quartic_value_and_grad = jax.jit(jax.value_and_grad(quartic))  # one compilation, not one per op


@pytest.mark.parametrize(
    ("dtype", "momentum", "jit"),
    [(jnp.float32, 0.9, False), (jnp.bfloat16, 0.0, False), (jnp.float32, 0.9, True)],
)
def test_radius_zero_is_optax_sgd(dtype, momentum, jit):
    """Bit for bit eagerly; under jax.jit XLA may fuse the same operations differently
    (optax.sgd itself moves by 1 ulp between eager and jitted), so there to round-off."""
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    for lr in (0.1, schedule):
        ours, theirs = rbo(lr, radius=0.0, momentum=momentum), optax.sgd(lr, momentum=momentum)

        def ours_step(params, state, ours=ours):
            value, grad = quartic_value_and_grad(params)
            updates, state = ours.update(grad, state, params, value=value, value_fn=quartic)
            return optax.apply_updates(params, updates), state

        def theirs_step(params, state, theirs=theirs):
            updates, state = theirs.update(quartic_value_and_grad(params)[1], state, params)
            return optax.apply_updates(params, updates), state

        if jit:
            ours_step, theirs_step = jax.jit(ours_step), jax.jit(theirs_step)
        a = b = nested_params(dtype)
        state_a, state_b = ours.init(a), theirs.init(b)
        for _ in range(3):
            a, state_a = ours_step(a, state_a)
            b, state_b = theirs_step(b, state_b)
            assert tree_get(state_a, "grad_evals") == 1
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert leaf_a.dtype == dtype
            atol = 1e-6 if jit else 0  # float32 round-off of parameters of order 1
            np.testing.assert_allclose(np.asarray(leaf_a), np.asarray(leaf_b), rtol=0, atol=atol)


@pytest.mark.parametrize("radius", [0.5, 3.0])
def test_affine_loss_steps_exactly_minus_lr_times_gradient(x64, radius):
    params = nested_params(jnp.float64)
    slopes = jax.tree.map(lambda p: jnp.linspace(-2.0, 3.0, p.size).reshape(p.shape), params)

    def affine(x):
        return sum(jnp.sum(a * p) for a, p in zip(jax.tree.leaves(slopes), jax.tree.leaves(x),
                                                   strict=True)) + 1.5  # fmt: skip

    tx = rbo(0.3, radius)
    value, grad = jax.value_and_grad(affine)(params)
    updates, state = tx.update(grad, tx.init(params), params, value=value, value_fn=affine)
    for update, slope in zip(jax.tree.leaves(updates), jax.tree.leaves(slopes), strict=True):
        np.testing.assert_allclose(update, -0.3 * slope, rtol=1e-12, atol=1e-14)
    assert tree_get(state, "grad_evals") == 2 and tree_get(state, "converged")


def test_non_finite_values_leave_the_parameters_unchanged():
    params = nested_params()
    start = jax.tree.leaves(params)

    def poisoned(x, at_start_only):  # finite at θ, NaN at every other point
        moved = jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(x), start, strict=True)])
        moved = moved.any()
        return quartic(x) + jnp.where(moved, jnp.nan, 0.0) * at_start_only

    tx = optax.apply_if_finite(rbo(0.1, 0.5, momentum=0.9), max_consecutive_errors=5)
    update = jax.jit(tx.update, static_argnames="value_fn")
    state = tx.init(params)
    value, grad = quartic_value_and_grad(params)
    updates, state = update(
        grad, state, params, value=value, grad=grad, value_fn=poisoned, at_start_only=1.0
    )
    new = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(new), start, strict=True):
        np.testing.assert_array_equal(a, b)
    # rbo refused the step itself: one trial point evaluated, momentum and count kept
    assert tree_get(state, "skipped") and tree_get(state, "grad_evals") == 2
    assert not tree_get(state, "moved") and STALLS[int(tree_get(state, "stall"))] == "skipped"
    assert tree_get(state, "count") == 0 and math.isnan(tree_get(state, "residual"))
    assert all(not jnp.any(m) for m in jax.tree.leaves(tree_get(state, "momentum")))
    assert tree_get(state, "notfinite_count") == 0  # apply_if_finite saw a finite (zero) update

    nan_grad = jax.tree.map(lambda g: g * jnp.nan, grad)  # a NaN gradient at θ: optax's check
    updates, state = update(
        nan_grad, state, params, value=value, grad=nan_grad, value_fn=poisoned, at_start_only=0.0
    )
    assert all(not jnp.any(u) for u in jax.tree.leaves(updates))
    assert tree_get(state, "notfinite_count") == 1

    updates, state = update(  # a NaN loss at θ with a finite gradient: rbo's check, no call
        grad, state, params, value=jnp.nan, grad=grad, value_fn=poisoned, at_start_only=0.0
    )
    assert all(not jnp.any(u) for u in jax.tree.leaves(updates))
    assert tree_get(state, "skipped") and tree_get(state, "grad_evals") == 1
    assert tree_get(state, "notfinite_count") == 0


def test_any_pytree_and_low_precision_dtypes():
    params = {
        "w": jnp.ones((3, 2), jnp.bfloat16) * 0.5,
        "b": (jnp.zeros((2,), jnp.float16), [jnp.full((4,), 0.3, jnp.float32)]),
    }
    tx = rbo(0.1, 0.2, projection_tol=1e-2)
    value, grad = quartic_value_and_grad(params)
    updates, state = jax.jit(tx.update, static_argnames="value_fn")(
        grad, tx.init(params), params, value=value, value_fn=quartic
    )
    for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert update.dtype == param.dtype and bool(jnp.all(jnp.isfinite(update)))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert isinstance(state, RBOState) and state.residual.dtype == jnp.float32
    assert 2 <= int(tree_get(state, "grad_evals")) <= 21 and not tree_get(state, "skipped")


def test_radius_schedule_starts_as_sgd(x64):
    params = nested_params(jnp.float64)
    radius = lambda count: jnp.where(count == 0, 0.0, 0.5)  # noqa: E731
    tx = rbo(0.1, radius, projection="gd", projection_steps=3, projection_tol=0)
    state = tx.init(params)
    value, grad = quartic_value_and_grad(params)
    updates, state = tx.update(grad, state, params, value=value, value_fn=quartic)
    for update, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grad), strict=True):
        np.testing.assert_array_equal(update, -0.1 * g)
    assert tree_get(state, "grad_evals") == 1
    params = optax.apply_updates(params, updates)
    value, grad = quartic_value_and_grad(params)
    _, state = tx.update(grad, state, params, value=value, value_fn=quartic)
    assert tree_get(state, "grad_evals") == 3 and tree_get(state, "count") == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(radius=-1.0), "radius must be a finite number >= 0"),
        (dict(learning_rate=math.nan), r"learning rate \(lr\) must be a finite number >= 0"),
        (dict(max_update=0.0), "max_update must be a finite number > 0"),
        (dict(projection="newton"), "unknown projection solver 'newton'"),
        (dict(projection_steps=0), "projection_steps must be an int >= 1"),
        (dict(anderson_memory=0), "anderson_memory must be an int >= 1"),
        (dict(loss_scale=0.0), "loss_scale must be a finite number > 0"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        rbo(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(learning_rate="0.1"), r"learning rate \(lr\) must be .*, got str '0.1'; pass float"),
        (dict(radius=jnp.asarray(0.2)), r"radius must be .*, got ArrayImpl .*; pass float"),
        (dict(momentum=True), "momentum must be .*, got bool True"),
        (dict(projection_steps=2.5), "projection_steps must be an int >= 1, got float 2.5"),
        (dict(max_update="1"), "max_update must be .*, got str '1'"),
    ],
)
def test_a_wrong_type_is_refused_naming_the_type(options, message):
    with pytest.raises(TypeError, match=message):
        rbo(**options)


NO_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")

sys.meta_path.insert(0, NoTorch())
import jax, jax.numpy as jnp, optax
import rollingball
from rollingball.optax import rbo

try:
    rollingball.RBO
except ImportError as error:
    print("RBO:", error)
tx = rbo(0.1, 0.5, projection="gd", projection_steps=2)
params = {"w": jnp.array([1.0, -2.0])}
loss = lambda p: jnp.sum(jnp.cos(p["w"]))
value, grad = jax.value_and_grad(loss)(params)
updates, state = tx.update(grad, tx.init(params), params, value=value, value_fn=loss)
print("grad_evals", int(optax.tree_utils.tree_get(state, "grad_evals")))
print("torch loaded:", any(name.split(".")[0] == "torch" for name in sys.modules))
"""


def test_rollingball_and_its_optax_part_work_without_torch():
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith(
        "RBO: rollingball.RBO needs PyTorch: pip install 'rollingball[torch]'"
    )
    assert lines[1] == "grad_evals 2"
    assert lines[2] == "torch loaded: False"


def test_flax_nnx_example_trains():
    spec = importlib.util.spec_from_file_location(
        "flax_nnx_example", Path(__file__).parents[1] / "examples" / "flax_nnx.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    options = ["--width", "16", "--batch", "64", "--projection", "gd", "--projection-steps", "2"]
    losses = example.main(["--steps", "40", *options])  # gd: the quicker loop to compile
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_the_jax_extra_does_not_bring_torch():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["jax"]]
    assert not [name for name in names if name.lower().startswith("torch")]
    assert {"jax", "optax"} <= {name.split(">")[0].split("=")[0] for name in names}


def test_the_flax_example_names_the_extra_that_installs_flax():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = [n.split(">")[0] for n in extras["optional-dependencies"]["flax"]]
    assert {"jax", "optax", "flax"} <= set(names) and not any("torch" in n for n in names)
    for document in ("examples/flax_nnx.py", "docs/jax.md", "README.md"):
        assert "pip install 'rollingball[flax]'" in (root / document).read_text(), document


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rollingball.optax import rbo

assert jax.device_count() == 2, jax.devices()
key = jax.random.PRNGKey(0)
k1, k2, k3, k4 = jax.random.split(key, 4)
params = {"w1": 0.5 * jax.random.normal(k1, (8, 32)), "b1": jnp.zeros(32),
          "w2": 0.5 * jax.random.normal(k2, (32, 3)), "b2": jnp.zeros(3)}
x = jax.random.normal(k3, (64, 8))
y = jax.random.randint(k4, (64,), 0, 3)

def loss_fn(p, x, y):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

# gd: the quicker loop to compile (twice here); the solvers share the sharded computation,
# value_fn's loss and gradient, and every other reduction is over replicated parameters
tx = rbo(learning_rate=0.5, radius=0.3, momentum=0.9, projection="gd", projection_steps=4,
         projection_step_size=0.5, projection_tol=1e-3)

@jax.jit
def train_step(p, state, x, y):
    value, grad = jax.value_and_grad(loss_fn)(p, x, y)
    updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn, x=x, y=y)
    return optax.apply_updates(p, updates), state, value

def train(p, x, y):
    state, evals, losses = tx.init(p), [], []
    for _ in range(8):
        p, state, value = train_step(p, state, x, y)
        evals.append(int(optax.tree_utils.tree_get(state, "grad_evals")))
        losses.append(float(value))
    return p, evals, losses

one = jax.devices()[0]
single = train(jax.device_put(params, one), jax.device_put(x, one), jax.device_put(y, one))
mesh = Mesh(np.array(jax.devices()), ("batch",))
batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
assert len(xs.addressable_shards) == 2 and xs.addressable_shards[0].data.shape == (32, 8)
sharded = train(jax.device_put(params, replicated), xs, ys)
assert sharded[0]["w1"].sharding.is_fully_replicated
error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(single[0])))
print("grad_evals", single[1], sharded[1])
print("loss", single[2][0], single[2][-1])
print("error", error)
"""


def test_a_batch_sharded_across_two_devices_gives_the_single_device_step():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(rollingball.__file__).parents[1]),
    }
    done = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    single, sharded = lines["grad_evals"].split("] [")
    assert single + "]" == "[" + sharded  # the same closure calls, step by step
    first, last = map(float, lines["loss"].split())
    assert last < 0.7 * first  # it trains
    assert float(lines["error"]) < 1e-5  # float32 round-off of a sum split in two
