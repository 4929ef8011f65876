"""The landscape microscope: synthetic landscapes, exact ironing, trajectories, slices, sharpness.

``iron`` closes a sampled landscape by a ball of radius ρ (what the rolling ball can touch);
``trajectory`` records any optimizer on a synthetic function; ``loss_slice`` cuts a trained
model's loss along filter-normalised directions; the sharpness routines measure the Hessian
and the loss increase in a ball. Figures live in `rollingball.landscape.plots` (matplotlib).
Importing this package needs only torch and numpy; rich (progress bars), matplotlib and
Pillow (figures) come with the ``landscape`` extra and are imported where used.
"""

from rollingball.landscape.functions import (
    FUNCTIONS,
    GaussianWells,
    SyntheticFunction,
    ackley,
    get_function,
    rastrigin,
    rosenbrock,
    weierstrass,
    weierstrass_like,
    wrinkled_quadratic,
)
from rollingball.landscape.ironing import (
    centre_height,
    iron,
    monotonicity_gap,
    unreachable,
    unreachable_from_ironed,
)
from rollingball.landscape.sharpness import (
    average_sharpness,
    dataset_loss,
    hessian_top_eigenvalue,
    hessian_trace,
    worst_case_sharpness,
)
from rollingball.landscape.slices import filter_normalized_direction, ironed_slices, loss_slice
from rollingball.landscape.trajectories import Trajectory, trajectory

__all__ = [
    "FUNCTIONS",
    "GaussianWells",
    "SyntheticFunction",
    "Trajectory",
    "ackley",
    "average_sharpness",
    "centre_height",
    "dataset_loss",
    "filter_normalized_direction",
    "get_function",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "iron",
    "ironed_slices",
    "loss_slice",
    "monotonicity_gap",
    "rastrigin",
    "rosenbrock",
    "trajectory",
    "unreachable",
    "unreachable_from_ironed",
    "weierstrass",
    "weierstrass_like",
    "worst_case_sharpness",
    "wrinkled_quadratic",
]
