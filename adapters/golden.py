"""Golden-section search: the minimum of a convex function of one variable on an interval.

Calibration (1/T) and prototype heads (their temperature) both fit one
scalar whose loss is convex; this finds it without gradients or step sizes.
"""

import math
from collections.abc import Callable

STEPS = 60  # the bracket shrinks by 0.618**60 (~3e-13 of its width): far below any meaningful difference
_RATIO = (math.sqrt(5) - 1) / 2


def golden_section_minimum(f: Callable[[float], float], lo: float, hi: float, steps: int = STEPS) -> float:
    """The x in [lo, hi] where the convex ``f`` is smallest (the middle of the final bracket)."""
    a, b = hi - _RATIO * (hi - lo), lo + _RATIO * (hi - lo)
    f_a, f_b = f(a), f(b)
    for _ in range(steps):
        if f_a <= f_b:
            hi, b, f_b = b, a, f_a
            a = hi - _RATIO * (hi - lo)
            f_a = f(a)
        else:
            lo, a, f_a = a, b, f_b
            b = lo + _RATIO * (hi - lo)
            f_b = f(b)
    return (lo + hi) / 2
