"""L2-penalised multinomial logistic regression, many problems side by side on one feature matrix.

Why side by side: a recipe search fits dozens of logistic regressions on the same
features (every fold x class weighting x penalty). Alone, each is a skinny
matmul (N x D by D x C) that a CPU runs at a tenth of its speed; side by side
they are one wide matmul. Each problem keeps its own L-BFGS memory and step
length, and a problem that has converged drops out of the matmul.

Why fast per problem: the features are centred and rotated onto their
principal axes first (an exact change of variables: the penalty is rotation
invariant and the bias absorbs the centre), which also drops the directions the
data does not span (N < D: at most N of them). On those axes the loss's
Hessian is nearly diagonal, bounded by Boehning's 1/2 x covariance, so each
axis is rescaled by 1 / sqrt(covariance / 2 + weight_decay): L-BFGS then starts
on a problem about as round as a sphere and converges in tens of steps, not
hundreds.

Problem p minimises  sum_i r[p, i] * CE(z_i W_p + b_p, y_i) + weight_decay[p] / 2 * ||W_p||^2
(bias not penalised), where the row weights r[p] sum to 1: a fold leaves its
validation rows out with weight 0, class weights scale the rest. With uniform
weights that is scikit-learn's LogisticRegression at C = 1 / (weight_decay * N).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.errors import InvalidInput, TrainingCancelled

HISTORY = 6  # L-BFGS curvature pairs kept per problem
ARMIJO = 1e-4  # sufficient decrease of a step
MAX_HALVINGS = 20  # backtracking steps before a problem's step is given up
DEFAULT_TOLERANCE = 1e-6  # converged: relative change of the objective below this over one step
# A final fit's rule instead: the gradient's Euclidean norm below this (on these problems, closer to the optimum than
# the change rule at 1e-6 got, in about as many steps). Unlike the change of the objective, it does not mistake a warm
# start's small first steps for convergence, and it reads the same on the raw features as on their principal axes.
FINAL_GRADIENT_TOLERANCE = 3e-4
FINAL_TOLERANCE = 1e-12  # with the gradient rule: stop only where float64 steps no longer lower the objective
DEFAULT_MAX_ITERATIONS = 300
HESSIAN_BOUND = 0.5  # Boehning: the softmax cross-entropy's Hessian is at most 1/2 x the feature covariance
RANK_CUTOFF = 1e-7  # principal axes with variance below this fraction of the largest carry nothing to fit
# Values held at once by the problems solved side by side (float32: 256 MiB); more problems are solved in turns.
SIDE_BY_SIDE_ELEMENTS = 1 << 26
ROW_COPIES = 6  # [N, P, C] tensors an objective evaluation holds: logits, log-probabilities, residual and temporaries
PARAMETER_COPIES = 8  # [P, R + 1, C] tensors L-BFGS holds beside its history: iterate, gradient, direction, trials


@dataclass(frozen=True)
class Solution:
    """Every problem's weights and bias (nn.Linear's layout) and the L-BFGS steps it took."""

    weight: Tensor  # [P, C, D]
    bias: Tensor  # [P, C]
    iterations: Tensor  # [P]

    def logits(self, z: Tensor) -> Tensor:
        """Every problem's logits of ``z`` [N, D]: [P, N, C]."""
        return torch.einsum("nd,pcd->pnc", z.float(), self.weight) + self.bias[:, None, :]


def solve(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    row_weights: Tensor,
    weight_decay: Tensor,
    *,
    start: Solution | None = None,
    axes: "PrincipalAxes | None" = None,
    dtype: torch.dtype = torch.float32,
    tolerance: float = DEFAULT_TOLERANCE,
    gradient_tolerance: float | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    cancelled: Callable[[], bool] | None = None,
) -> Solution:
    """Fit P logistic regressions on features ``z`` [N, D] and labels ``y`` [N].

    ``row_weights`` [P, N] (each row summing to 1) and ``weight_decay`` [P]
    define the problems; ``start`` warm-starts them. ``axes`` are
    `PrincipalAxes.of(z)` when the caller solves on the same features again.
    ``dtype``: float32 ranks candidates as well and twice as fast; float64
    converges a final head as far as scikit-learn does. A problem has
    converged when one step changes its objective by less than ``tolerance``
    (relative), or, with ``gradient_tolerance``, when its gradient's norm is
    below that (a warm start already there takes no step and needs no axes). ``cancelled`` is
    checked at every step.
    """
    n, _ = z.shape
    p = row_weights.shape[0]
    if row_weights.shape != (p, n) or weight_decay.shape != (p,) or y.shape != (n,):
        raise InvalidInput(
            f"row_weights must be [P, {n}], weight_decay [P] and y [{n}]; got {list(row_weights.shape)}, "
            f"{list(weight_decay.shape)} and {list(y.shape)}"
        )
    if axes is not None and axes.coordinates.shape[0] != n:
        raise InvalidInput(f"axes of {axes.coordinates.shape[0]} rows given for features of {n} rows")
    decay = weight_decay.to(dtype)
    onehot = F.one_hot(y.long(), num_classes).to(dtype)
    if start is not None and gradient_tolerance is not None:  # the gradient the axes would see: centred features
        mean = z.to(dtype).mean(0)
        at_start = _Objective(z.to(dtype) - mean, onehot, row_weights.to(dtype), decay)
        weight = start.weight.transpose(1, 2).to(dtype)  # [P, D, C]
        theta = torch.cat([weight, (start.bias.to(dtype) + mean @ weight)[:, None, :]], dim=1)
        _, grad = at_start(theta, torch.arange(p))
        if bool((grad.flatten(1).norm(dim=1) <= gradient_tolerance).all()):  # already there: no axes, no step
            return Solution(start.weight.float(), start.bias.float(), torch.zeros(p, dtype=torch.int64))
    axes = PrincipalAxes.of(z.to(dtype)) if axes is None else axes.to(dtype)
    # Per problem and axis (the bias last): the preconditioning change of variables theta = scale * v.
    curvature = HESSIAN_BOUND * axes.variance[None, :] + decay[:, None]
    scale = torch.cat([curvature.rsqrt(), torch.full((p, 1), HESSIAN_BOUND**-0.5, dtype=dtype)], dim=1)  # [P, R + 1]
    if start is None:
        v = torch.zeros(p, axes.rank + 1, num_classes, dtype=dtype)
    else:
        v = axes.to_axes(start) / scale[:, :, None]
    iterations = torch.zeros(p, dtype=torch.int64)
    for chunk in _chunks(p, n, axes.rank + 1, num_classes):
        objective = _Objective(axes.coordinates, onehot, row_weights[chunk].to(dtype), decay[chunk])
        v[chunk], iterations[chunk] = _lbfgs(
            objective, v[chunk], scale[chunk], _Stop(tolerance, gradient_tolerance), max_iterations, cancelled
        )
    return axes.from_axes(v * scale[:, :, None], iterations)


def _chunks(problems: int, rows: int, parameters: int, classes: int) -> list[slice]:
    """The problems in groups that each hold at most SIDE_BY_SIDE_ELEMENTS values at once: a request's size
    bounds the solver's memory, however many problems a search poses (one problem alone is what it is)."""
    per_problem = classes * (ROW_COPIES * rows + (2 * HISTORY + PARAMETER_COPIES) * parameters)
    size = max(1, SIDE_BY_SIDE_ELEMENTS // per_problem)
    return [slice(start, min(start + size, problems)) for start in range(0, problems, size)]


@dataclass(frozen=True)
class PrincipalAxes:
    """The centred features on their principal axes: z - mean = coordinates @ basis.T, exactly on the data."""

    mean: Tensor  # [D]
    basis: Tensor  # [D, R], orthonormal columns
    coordinates: Tensor  # [N, R]
    variance: Tensor  # [R]: mean square of each coordinate

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @classmethod
    def of(cls, z: Tensor) -> "PrincipalAxes":
        n, d = z.shape
        mean = z.mean(0)
        centred = z - mean
        if n <= d:  # the N x N Gram matrix is the smaller eigenproblem
            values, vectors = torch.linalg.eigh((centred @ centred.T).double())
            keep = values > RANK_CUTOFF * values[-1].clamp(min=1e-30)
            values, vectors = values[keep].to(z.dtype), vectors[:, keep].to(z.dtype)
            coordinates = vectors * values.sqrt()
            basis = centred.T @ (vectors / values.sqrt())
        else:
            values, vectors = torch.linalg.eigh((centred.T @ centred).double())
            keep = values > RANK_CUTOFF * values[-1].clamp(min=1e-30)
            values, basis = values[keep].to(z.dtype), vectors[:, keep].to(z.dtype)
            coordinates = centred @ basis
        return cls(mean, basis, coordinates, values / n)

    def to(self, dtype: torch.dtype) -> "PrincipalAxes":
        """The same axes in ``dtype``: computed once in float64, they serve float32 searches and float64 fits."""
        if self.basis.dtype == dtype:
            return self
        return PrincipalAxes(*(t.to(dtype) for t in (self.mean, self.basis, self.coordinates, self.variance)))

    def to_axes(self, solution: Solution) -> Tensor:
        """A solution's parameters in these coordinates: [P, R + 1, C], the bias last (centred)."""
        weight = solution.weight.transpose(1, 2).to(self.basis.dtype)  # [P, D, C]
        bias = solution.bias.to(self.basis.dtype) + self.mean @ weight  # the centred features' bias
        return torch.cat([self.basis.T @ weight, bias[:, None, :]], dim=1)

    def from_axes(self, theta: Tensor, iterations: Tensor) -> Solution:
        weight = self.basis @ theta[:, :-1, :]  # [P, D, C]
        bias = theta[:, -1, :] - self.mean @ weight
        return Solution(
            weight=weight.transpose(1, 2).float().contiguous(), bias=bias.float().contiguous(), iterations=iterations
        )


class _Objective:
    """Each problem's penalised weighted cross-entropy and its gradient, all problems in one wide matmul each way."""

    def __init__(self, coordinates: Tensor, onehot: Tensor, row_weights: Tensor, weight_decay: Tensor) -> None:
        n = coordinates.shape[0]
        self.z1 = torch.cat([coordinates, coordinates.new_ones(n, 1)], dim=1)  # the bias as a last coordinate
        self.onehot = onehot
        self.row_weights = row_weights  # [P, N]
        self.weight_decay = weight_decay  # [P]

    def __call__(self, theta: Tensor, problems: Tensor) -> tuple[Tensor, Tensor]:
        """Value [P'] and gradient [P', R + 1, C] at ``theta`` [P', R + 1, C] of the ``problems`` [P'] it holds."""
        p, features, c = theta.shape
        n = self.z1.shape[0]
        logits = (self.z1 @ theta.permute(1, 0, 2).reshape(features, p * c)).view(n, p, c)
        log_probs = torch.log_softmax(logits, dim=2)
        weights = self.row_weights[problems].T[:, :, None]  # [N, P', 1]
        decay = self.weight_decay[problems]
        data = -(weights * log_probs * self.onehot[:, None, :]).sum((0, 2))
        penalty = 0.5 * decay * theta[:, :-1].square().sum((1, 2))
        residual = (log_probs.exp() - self.onehot[:, None, :]) * weights
        grad = (self.z1.T @ residual.reshape(n, p * c)).view(features, p, c).permute(1, 0, 2).clone()
        grad[:, :-1] += decay[:, None, None] * theta[:, :-1]
        return data + penalty, grad


@dataclass(frozen=True)
class _Stop:
    """When a problem has converged (`solve`)."""

    tolerance: float
    gradient_tolerance: float | None

    def done(self, value: Tensor, new_value: Tensor, grad_theta: Tensor) -> Tensor:
        """Per problem: the step from ``value`` to ``new_value`` has converged, or the gradient [P, M] is small."""
        size = torch.maximum(value.abs(), new_value.abs()).clamp(min=1.0)
        return ((value - new_value).abs() <= self.tolerance * size) | self.small(grad_theta)

    def small(self, grad_theta: Tensor) -> Tensor:
        if self.gradient_tolerance is None:
            return torch.zeros(grad_theta.shape[0], dtype=torch.bool)
        return grad_theta.norm(dim=1) <= self.gradient_tolerance  # the same on any orthonormal axes


def _lbfgs(
    objective: _Objective,
    v: Tensor,
    scale: Tensor,
    stop: _Stop,
    max_iterations: int,
    cancelled: Callable[[], bool] | None,
) -> tuple[Tensor, Tensor]:
    """L-BFGS with a backtracking (Armijo) line search, per problem, on ``v`` [P, R + 1, C] where theta = scale * v."""
    p = v.shape[0]
    shape = v.shape[1:]
    scale3 = scale[:, :, None]

    def evaluate(v_active: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        value, grad = objective(v_active.view(len(active), *shape) * scale3[active], active)
        return value, (grad * scale3[active]).reshape(len(active), -1)

    scale_flat = scale3.expand(p, *shape).reshape(p, -1)  # d theta / d v, per parameter

    iterations = torch.zeros(p, dtype=torch.int64)
    active = torch.arange(p)
    x = v.reshape(p, -1).clone()  # every problem's parameters; the active ones are updated
    cur = x.clone()  # the active problems' parameters, compacted
    value, grad = evaluate(cur, active)
    s_hist: list[Tensor] = []  # [P', M] each, compacted with the active problems
    y_hist: list[Tensor] = []
    rho_hist: list[Tensor] = []

    def retire(done: Tensor) -> None:
        """Keep the converged problems' parameters and drop them from the matmul."""
        nonlocal active, cur, value, grad, s_hist, y_hist, rho_hist
        x[active[done]] = cur[done]
        keep = ~done
        active, cur, value, grad = active[keep], cur[keep], value[keep], grad[keep]
        s_hist = [s[keep] for s in s_hist]
        y_hist = [y[keep] for y in y_hist]
        rho_hist = [r[keep] for r in rho_hist]

    retire(stop.small(grad / scale_flat[active]))  # a warm start that is already there
    for _ in range(max_iterations):
        if len(active) == 0:
            break
        if cancelled is not None and cancelled():
            raise TrainingCancelled("training was cancelled")
        direction = _direction(grad, s_hist, y_hist, rho_hist)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0  # a stale curvature pair: fall back to steepest descent
        if uphill.any():
            direction[uphill] = -grad[uphill]
            slope = torch.where(uphill, -(grad * grad).sum(1), slope)
        step = grad.new_ones(len(active)) if s_hist else (1.0 / grad.abs().sum(1)).clamp(max=1.0)
        new_value, new_grad = evaluate(cur + step[:, None] * direction, active)
        for _ in range(MAX_HALVINGS):
            short = ~(new_value <= value + ARMIJO * step * slope)  # NaN counts as short
            if not short.any():
                break
            step = torch.where(short, step / 2, step)
            retried = evaluate(cur[short] + step[short, None] * direction[short], active[short])
            new_value[short], new_grad[short] = retried
        moved = step[:, None] * direction
        change = new_grad - grad
        sy = (moved * change).sum(1)
        s_hist.append(moved)
        y_hist.append(change)
        rho_hist.append(torch.where(sy > 1e-12, 1.0 / sy.clamp(min=1e-12), torch.zeros_like(sy)))
        if len(s_hist) > HISTORY:
            del s_hist[0], y_hist[0], rho_hist[0]
        cur = cur + moved
        iterations[active] += 1
        done = stop.done(value, new_value, new_grad / scale_flat[active])
        value, grad = new_value, new_grad
        if done.any():
            retire(done)
    x[active] = cur
    return x.view(p, *shape), iterations


def _direction(grad: Tensor, s_hist: list[Tensor], y_hist: list[Tensor], rho_hist: list[Tensor]) -> Tensor:
    """L-BFGS's two-loop recursion, per problem (rows): an approximation of -H^-1 grad."""
    q = -grad
    alphas = []
    for s, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist), strict=True):
        alpha = rho * (s * q).sum(1)
        q = q - alpha[:, None] * yv
        alphas.append(alpha)
    if s_hist:
        s, yv = s_hist[-1], y_hist[-1]
        yy = (yv * yv).sum(1)
        gamma = torch.where(yy > 0, (s * yv).sum(1) / yy.clamp(min=1e-30), torch.ones_like(yy))
        q = q * gamma[:, None]
    for s, yv, rho, alpha in zip(s_hist, y_hist, rho_hist, reversed(alphas), strict=True):
        beta = rho * (yv * q).sum(1)
        q = q + (alpha - beta)[:, None] * s
    return q
