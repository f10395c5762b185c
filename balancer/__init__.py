"""The balancer: a slot-aware, health-checked streaming proxy in front of the workers.

Each request goes to the worker that holds its conversation's prefix unless that worker is much busier
(``routing = "prefix"``, the default), else the least loaded; waiting requests are served fairly
between API keys."""

from balancer.app import create_app
from balancer.pool import WorkerPool
from balancer.settings import BalancerSettings

__all__ = ["BalancerSettings", "WorkerPool", "create_app"]
