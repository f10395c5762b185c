"""The compose runtime: the same services as containers, through the Docker Engine and compose.yaml."""

from appliance.runtime.compose.runtime import DATA_DIRS, PROJECT, ComposeRuntime, worker_index

__all__ = ["DATA_DIRS", "PROJECT", "ComposeRuntime", "worker_index"]
