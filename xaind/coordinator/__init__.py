"""The coordinator daemon: the control plane of federated training."""
