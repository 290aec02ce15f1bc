"""The grid a hyper-parameter search tries: what a request may send, and the default each kind's record holds."""

import random
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_TRIALS = 64
# Values per searched list. The grid is never enumerated (its size is a product,
# its points are decoded from indices), so this bounds only the request's size.
MAX_GRID_VALUES = 64
# Which grid points a search larger than `max_trials` tries: fixed, so a request
# always trains the same trials.
SAMPLE_SEED = 0

GridPoint = tuple[float, float, int | None]  # (lr, weight_decay, hidden)


class SearchSpace(BaseModel):
    """Values to try, as a grid. Bounds match `HyperParams`; bad values fail validation.

    Each list holds at most `MAX_GRID_VALUES` values. When the grid has more
    points than `max_trials`, a fixed-seed random sample of `max_trials` points
    is tried instead, picked by index without building the grid.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lr: list[Annotated[float, Field(gt=0.0, le=10.0)]] = Field(min_length=1, max_length=MAX_GRID_VALUES)
    weight_decay: list[Annotated[float, Field(ge=0.0, le=10.0)]] = Field(min_length=1, max_length=MAX_GRID_VALUES)
    hidden: list[Annotated[int, Field(ge=1, le=8192)]] | None = Field(
        default=None, min_length=1, max_length=MAX_GRID_VALUES
    )
    max_trials: int = Field(default=MAX_TRIALS, ge=1, le=MAX_TRIALS)

    @property
    def size(self) -> int:
        """How many (lr, weight_decay, hidden) combinations the grid has."""
        return len(self.lr) * len(self.weight_decay) * len(self.hidden or [None])

    @property
    def trials(self) -> int:
        """How many of them a search trains."""
        return min(self.size, self.max_trials)

    def points(self) -> list[GridPoint]:
        """The combinations a search trains, in grid order: all, or the fixed sample of `max_trials`."""
        if self.size <= self.max_trials:
            indices: list[int] | range = range(self.size)
        else:
            indices = sorted(random.Random(SAMPLE_SEED).sample(range(self.size), self.max_trials))
        return [self._point(index) for index in indices]

    def _point(self, index: int) -> GridPoint:
        """The grid point at ``index`` of the row-major (lr, weight_decay, hidden) order."""
        hidden: list[int | None] = [*self.hidden] if self.hidden else [None]
        index, k = divmod(index, len(hidden))
        i, j = divmod(index, len(self.weight_decay))
        return self.lr[i], self.weight_decay[j], hidden[k]
