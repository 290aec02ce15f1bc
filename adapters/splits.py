"""Split labelled examples into train and holdout without losing any class."""

from collections.abc import Sequence

import numpy as np

from adapters.errors import InvalidInput


def stratified_split(
    labels: Sequence[int], holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_idx, holdout_idx) that keep class proportions.

    Each class is split on its own so that a small class still lands on both
    sides: every class with two or more examples gets at least one example in
    each side; a class with a single example goes to train, where it is at
    least learnable. The same labels and seed always give the same split.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise InvalidInput(
            f"holdout_fraction must be between 0 and 1 (exclusive), got {holdout_fraction}",
            holdout_fraction=holdout_fraction,
        )
    label_array = np.asarray(labels)
    if label_array.ndim != 1 or label_array.size == 0:
        raise InvalidInput("labels must be a non-empty flat sequence of class ids")

    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    holdout_parts: list[np.ndarray] = []
    for label in np.unique(label_array):
        members = np.flatnonzero(label_array == label)
        rng.shuffle(members)
        if members.size < 2:
            train_parts.append(members)
            continue
        holdout_count = min(max(round(members.size * holdout_fraction), 1), members.size - 1)
        holdout_parts.append(members[:holdout_count])
        train_parts.append(members[holdout_count:])

    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    holdout_idx = np.sort(np.concatenate(holdout_parts or [np.empty(0, np.int64)])).astype(np.int64)
    return train_idx, holdout_idx
