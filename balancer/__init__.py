"""The balancer: least-connections, slot-aware, health-checked streaming proxy in front of the workers."""

from balancer.app import create_app
from balancer.pool import WorkerPool
from balancer.settings import BalancerSettings

__all__ = ["BalancerSettings", "WorkerPool", "create_app"]
