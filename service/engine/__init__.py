"""The engine: everything between a decoded request and a tensor answer, for serving and for training.

Backbones and their verified weights, the device, image preprocessing, one
dynamic batcher per backbone, heterogeneous batch execution, the head cache, the
predict API both doors call, and feature extraction for training, which yields
to serving. See docs/architecture.md ("The engine").
"""
