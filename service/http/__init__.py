"""The HTTP door: a FastAPI app mounted into the BentoML service."""
