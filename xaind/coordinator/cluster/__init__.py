"""Several coordinator processes serving one training, their shared state in Redis (docs/scale.rst)."""
