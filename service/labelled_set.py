"""The labelled part of a dataset, read once, as training and audits learn from it.

A dataset may hold unlabelled examples (a pool) and be relabelled at any time, so what a head version learnt
from is not "the dataset" but this snapshot: its examples, their labels and classes, and a digest of them that
the version records (``examples_digest``), with the list itself (``training_examples``).
"""

import hashlib
from collections import Counter

from pydantic import BaseModel

from service.errors import FailedPrecondition
from service.store.datasets import DatasetStore, ExampleInfo


class LabelledSet(BaseModel):
    """Labelled examples in upload order; ``classes`` are their labels, sorted (a class index is into it)."""

    dataset_id: str
    examples: list[ExampleInfo]
    classes: list[str]

    @property
    def labels(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.classes)}
        return [index[_label(example)] for example in self.examples]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(_label(example) for example in self.examples))

    @property
    def digest(self) -> str:
        """sha256 over the sorted (position, image sha256, label) triples, one per line, tab-separated."""
        lines = sorted((e.index, e.image_sha256, _label(e)) for e in self.examples)
        text = "".join(f"{position}\t{sha}\t{label}\n" for position, sha, label in lines)
        return hashlib.sha256(text.encode()).hexdigest()

    def record(self) -> dict[str, object]:
        """What a head version keeps of it: the count, the digest, and each example's position and class index."""
        return {
            "examples_used": len(self.examples),
            "examples_digest": self.digest,
            "training_examples": {"positions": [e.index for e in self.examples], "labels": self.labels},
        }


def labelled_set(datasets: DatasetStore, tenant: str, dataset_id: str) -> LabelledSet:
    """The dataset's labelled examples now; FailedPrecondition unless they have two classes at least."""
    dataset = datasets.get(tenant, dataset_id)  # NotFound first, for another tenant's too
    examples = datasets.labelled_examples(tenant, dataset_id)
    classes = sorted({_label(example) for example in examples})
    if len(classes) < 2:
        have = f"only class {classes[0]!r}" if classes else "no labelled examples"
        raise FailedPrecondition(
            f"dataset '{dataset_id}' has {have} ({dataset.num_unlabelled:,} unlabelled); label examples of at "
            "least two classes first (graft label DATASET EXAMPLE LABEL, or --import labels.csv)",
            dataset_id=dataset_id,
        )
    return LabelledSet(dataset_id=dataset_id, examples=examples, classes=classes)


def _label(example: ExampleInfo) -> str:
    assert example.label is not None  # labelled_examples returns labelled ones only
    return example.label
