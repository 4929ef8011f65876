"""Speed of `rollingball.landscape.iron` against a plain brute-force loop, side by side.

Run:  .venv/bin/python benchmarks/bench_iron.py [--quick]

The brute force loops over grid points and, for each, takes the max (then the min) over the
ball's window with NumPy: C(x) = max_z f(z) + b(z − x), I(z) = min_x C(x) − b(x − z);
a pure-Python double loop over (point, offset) pairs is timed on a smaller 1-D problem.
`iron` loops over the ball's offsets instead, vectorised over the whole grid. Both give the
same numbers (the largest difference is printed). Then `iron` alone on the sizes the issue
names: 10^5 points with a ball spanning 10^3 in 1-D, and 401 × 401 in 2-D.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from rollingball.landscape.ironing import iron


def brute_force_1d(f: np.ndarray, spacing: float, radius: float) -> np.ndarray:
    reach = int(np.floor(radius / spacing))
    offsets = np.arange(-reach, reach + 1)
    cap = np.sqrt(np.maximum(radius**2 - (offsets * spacing) ** 2, 0.0))
    n = len(f)
    centre = np.empty(n)
    for x in range(n):
        lo, hi = max(0, x - reach), min(n, x + reach + 1)
        centre[x] = np.max(f[lo:hi] + cap[lo - x + reach : hi - x + reach])
    ironed = np.empty(n)
    for z in range(n):
        lo, hi = max(0, z - reach), min(n, z + reach + 1)
        ironed[z] = np.min(centre[lo:hi] - cap[lo - z + reach : hi - z + reach])
    return np.maximum(ironed, f)


def python_loop_1d(f: np.ndarray, spacing: float, radius: float) -> np.ndarray:
    values, n = f.tolist(), len(f)
    reach = int(np.floor(radius / spacing))
    cap = [float(np.sqrt(max(radius**2 - (o * spacing) ** 2, 0.0))) for o in range(reach + 1)]
    centre = [max(values[z] + cap[abs(z - x)] for z in range(max(0, x - reach),
                  min(n, x + reach + 1))) for x in range(n)]  # fmt: skip
    ironed = [min(centre[x] - cap[abs(x - z)] for x in range(max(0, z - reach),
                  min(n, z + reach + 1))) for z in range(n)]  # fmt: skip
    return np.maximum(np.array(ironed), f)


def brute_force_2d(f: np.ndarray, spacing: float, radius: float) -> np.ndarray:
    reach = int(np.floor(radius / spacing))
    o = np.arange(-reach, reach + 1) * spacing
    d2 = o[:, None] ** 2 + o[None, :] ** 2
    cap = np.where(d2 <= radius**2, np.sqrt(np.maximum(radius**2 - d2, 0.0)), -np.inf)
    n, m = f.shape
    padded = np.full((n + 2 * reach, m + 2 * reach), -np.inf)
    padded[reach : reach + n, reach : reach + m] = f
    centre = np.empty_like(f)
    for i in range(n):
        for j in range(m):
            centre[i, j] = np.max(padded[i : i + 2 * reach + 1, j : j + 2 * reach + 1] + cap)
    padded.fill(np.inf)
    padded[reach : reach + n, reach : reach + m] = centre
    ironed = np.empty_like(f)
    for i in range(n):
        for j in range(m):
            window = padded[i : i + 2 * reach + 1, j : j + 2 * reach + 1]
            ironed[i, j] = np.min(np.where(np.isfinite(cap), window - cap, np.inf))
    return np.maximum(ironed, f)


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller side-by-side problems")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    n1, ball1 = (5_000, 201) if args.quick else (20_000, 1_001)
    x = np.linspace(0, 10, n1)
    f1 = np.sin(7 * x) + 0.1 * rng.normal(size=n1)
    h1 = x[1] - x[0]
    r1 = (ball1 // 2) * h1
    n2, ball2 = (41, 11) if args.quick else (101, 21)
    y = np.linspace(-1, 1, n2)
    f2 = np.sin(5 * y)[:, None] * np.cos(4 * y)[None, :] + 0.05 * rng.normal(size=(n2, n2))
    h2 = y[1] - y[0]
    r2 = (ball2 // 2) * h2

    n0, ball0 = (1_000, 101) if args.quick else (4_000, 401)
    f0, r0 = f1[:n0], (ball0 // 2) * h1

    print("side by side (same problem, same numbers):")
    for label, fast, slow in [
        (f"1-D, {n0} points, ball spans {ball0}, pure Python", lambda: iron(f0, h1, r0),
         lambda: python_loop_1d(f0, h1, r0)),
        (f"1-D, {n1} points, ball spans {ball1}", lambda: iron(f1, h1, r1),
         lambda: brute_force_1d(f1, h1, r1)),
        (f"2-D, {n2}x{n2}, ball spans {ball2}", lambda: iron(f2, h2, r2),
         lambda: brute_force_2d(f2, h2, r2)),
    ]:  # fmt: skip
        t_fast, a = timed(fast)
        t_slow, b = timed(slow)
        print(
            f"  {label:<48} iron {t_fast:8.3f} s   brute force {t_slow:8.3f} s   "
            f"ratio {t_slow / t_fast:7.1f}x   max |diff| {np.max(np.abs(a - b)):.1e}"
        )

    print("iron alone on the issue's sizes:")
    n = 100_000
    x = np.linspace(0, 10, n)
    f = np.sin(7 * x) + 0.1 * rng.normal(size=n)
    t, _ = timed(lambda: iron(f, x[1] - x[0], 500 * (x[1] - x[0])))
    print(f"  1-D, {n} points, ball spans 1001 points: {t:.2f} s")
    g = np.linspace(-1, 1, 401)
    f2 = np.sin(5 * g)[:, None] * np.cos(4 * g)[None, :] + 0.05 * rng.normal(size=(401, 401))
    for reach in (10, 25) if args.quick else (10, 25, 50):
        t, _ = timed(lambda r=reach: iron(f2, g[1] - g[0], r * (g[1] - g[0])))
        print(f"  2-D, 401x401, ball radius {reach} grid steps ({2 * reach + 1} across): {t:.2f} s")


if __name__ == "__main__":
    main()
