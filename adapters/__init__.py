"""What gets trained on top of frozen backbone features.

`kinds` is the registry of head kinds (one record each: how a kind is built,
fit, searched and served) and the config a head is stored with, `heads`
defines the head modules, `trainer` and `prototype` fit them, `tuning`
searches hyperparameters over a `search_space`, `metrics` evaluates logits,
and `splits` makes the train/holdout split; `errors` holds what they raise. Nothing
here knows about backbones, storage, transports or the service: inputs are
feature tensors and labels.
"""
