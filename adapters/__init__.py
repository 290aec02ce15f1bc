"""What gets trained on top of frozen backbone features.

`heads` defines the head modules and how they are stored, `trainer` fits one
head, `tuning` searches hyperparameters, `metrics` evaluates logits, and
`splits` makes the train/holdout split; `errors` holds what they raise. Nothing
here knows about backbones, storage, transports or the service: inputs are
feature tensors and labels.
"""
