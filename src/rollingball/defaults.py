"""RBO's default projection settings, one place for the torch optimizer and the optax
transformation (importable without torch or jax).

Chosen by the cost frontier in docs/results.md (`rollingball frontier`):
the cheapest projection whose test accuracy stays within the seed noise of the converged
projection on MNIST-1D and digits. Two trial points and the blind last step: 3 closure calls
per step (each rejected trial point adds one, up to 5); memory 1 keeps a step's peak at 5
parameter copies at most (4 measured by benchmarks/bench_memory.py, where the blind step needs
no buffer of its own).
"""

PROJECTION = "anderson"
PROJECTION_STEPS = 2
PROJECTION_STEP_SIZE = 1.0
PROJECTION_TOL = 1e-4
ANDERSON_MEMORY = 1
