"""The aggregator daemon: the data plane of federated training."""
