"""xaind: federated-learning coordination on Twisted."""

__version__ = "0.1.0"
