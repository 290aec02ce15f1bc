"""The engine: backbones, weights, devices and (later) preprocessing and batching."""
