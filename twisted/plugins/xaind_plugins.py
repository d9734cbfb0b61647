"""The twistd plugins of xaind: declarations only, the work lives in the package."""

from twisted.application.service import ServiceMaker

xain_coordinator = ServiceMaker(
    "xain-coordinator",
    "xaind.coordinator.tap",
    "xaind federated-learning coordinator (rounds, heartbeats, selection)",
    "xain-coordinator",
)

xain_aggregator = ServiceMaker(
    "xain-aggregator",
    "xaind.aggregator.tap",
    "xaind federated-learning aggregator (weights down and up, aggregation)",
    "xain-aggregator",
)
