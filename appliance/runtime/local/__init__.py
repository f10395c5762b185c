"""The local runtime: every service a process under supervisord on this host."""

from appliance.runtime.local.runtime import LocalRuntime, Progress

__all__ = ["LocalRuntime", "Progress"]
