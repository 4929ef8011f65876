"""rollingball: the Rolling Ball Optimizer (RBO) for PyTorch and JAX, and tools to see and test it.

`rollingball.RBO` (torch) is imported on first use, so that `import rollingball` and
`rollingball.optax` work where torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollingball.optim.rbo import RBO

__all__ = ["RBO"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name != "RBO":
        raise AttributeError(f"module 'rollingball' has no attribute {name!r}")
    try:
        from rollingball.optim.rbo import RBO
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ImportError(
            "rollingball.RBO needs PyTorch: pip install 'rollingball[torch]'. "
            "For JAX, use `from rollingball.optax import rbo` (pip install 'rollingball[jax]')."
        ) from error
    globals()["RBO"] = RBO
    return RBO
