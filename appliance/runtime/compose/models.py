"""Several models on compose: one worker service per resident worker and swap host, in a generated file.

With the single model of compose.yaml (``APPLIANCE_MODEL_PATH``/``APPLIANCE_MODEL_ALIAS``) nothing is
generated: compose.yaml's own ``inference-N`` services run as before. With ``[[models.entry]]`` (or after
`appliance models add`), ``data/run/compose.models.yaml`` is written and passed after the compose files:
it sets each ``inference-N``'s model (the file in the models volume, ``/data/models/...``, pinned to its
sha256; swap hosts: ``swap_host``, ``initial_model``, ``memory_bytes``) and defines the services past those
compose.yaml has as compose.yaml's worker (``x-inference``: image, user, volumes, secrets, healthcheck, the
same stop grace), each advertising its own name. Not by ``extends``: docker-compose 1.29 cannot extend a
service with ``depends_on``; tests/unit/test_model_plan.py keeps the two definitions equal. Model files must
be under ``data/models`` (the volume the workers mount).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from appliance.core.model_files import DEFAULT_MODEL_ALIAS, default_model_path, prepare_default_model
from appliance.core.model_settings import ModelConfig
from appliance.runtime.models import ModelPlan, WorkerRole, apply_changes, models_settings, plan_models, read_changes
from appliance.runtime.protocol import RuntimeFailure

if TYPE_CHECKING:
    from appliance.runtime.compose.runtime import ComposeRuntime

__all__ = ["IMAGE_MODEL", "OVERRIDE", "compose_model_plan", "render_override", "worker_path"]

OVERRIDE = "compose.models.yaml"
IMAGE_MODEL = "/opt/models/default.gguf"  # the bundled model inside the inference image
_VOLUME = "/data/models"
_PORT = 8201


def worker_path(host_path: Path, data: Path) -> str:
    """Where a worker container sees ``host_path`` (the models volume), or a RuntimeFailure."""
    models = (data / "models").resolve()
    resolved = host_path.resolve()
    if resolved == default_model_path(data).resolve():
        return IMAGE_MODEL
    if not resolved.is_relative_to(models):
        raise RuntimeFailure(f"{host_path} is outside {models}: compose workers only see the models volume; "
                             "copy the file there first")
    return f"{_VOLUME}/{resolved.relative_to(models).as_posix()}"


def _legacy(rt: ComposeRuntime) -> ModelConfig | None:
    """compose.yaml's one model (APPLIANCE_MODEL_PATH / APPLIANCE_MODEL_ALIAS of the environment or .env); None
    when its file is not on this host (the image's own model before `data/models` holds a copy)."""
    dotenv = rt._dotenv()
    data = rt.data_path()
    inside = os.environ.get("APPLIANCE_MODEL_PATH") or dotenv.get("APPLIANCE_MODEL_PATH") or IMAGE_MODEL
    alias = os.environ.get("APPLIANCE_MODEL_ALIAS") or dotenv.get("APPLIANCE_MODEL_ALIAS") or DEFAULT_MODEL_ALIAS
    if inside == IMAGE_MODEL:
        host = default_model_path(data)
    elif inside.startswith(_VOLUME + "/"):
        host = data / "models" / inside.removeprefix(_VOLUME + "/")
    else:
        return None
    if not host.is_file():
        return None
    try:
        return ModelConfig(alias=alias, path=host, workers=rt.settings.workers)
    except ValidationError:
        return None


def compose_model_plan(rt: ComposeRuntime, *, assemble: bool = False) -> ModelPlan | None:
    """The catalogue and each worker service's role; ``legacy``: compose.yaml's one model, nothing generated.
    None: compose.yaml's one model with no catalogue (its file is not on this host): it runs as before.
    ``assemble`` (the `models` verbs): put the bundled model's file in data/models for its catalogue entry."""
    models = models_settings()
    changes = read_changes(rt.settings.run_dir)
    legacy = _legacy(rt)
    if not models.entry and legacy is None:
        if changes["added"] or assemble:
            prepare_default_model(rt.data_path())  # the first model's file, for the catalogue beside the new one
            legacy = _legacy(rt)
        if legacy is None:
            return None
    base = list(models.entry) or ([legacy] if legacy is not None else [])
    configs = apply_changes(base, changes)
    if not configs:
        raise RuntimeFailure("no model left to serve: every configured model was removed")
    data = rt.data_path()
    paths = {c.alias: worker_path(c.path, data) for c in configs}
    if not models.entry and configs == [legacy]:
        try:
            return plan_models(configs, models, rt.settings.run_dir, legacy=True, worker_paths=paths)
        except RuntimeFailure:
            return None
    return plan_models(configs, models, rt.settings.run_dir, worker_paths=paths)


def _env(role: WorkerRole, index: int) -> dict[str, str]:
    entry, config = role.entry, role.config
    advertise = f"http://inference-{index}:{_PORT}"
    if role.swap_host:  # each entry it loads comes from the signed catalogue, with its own sha256, slots, n_ctx
        return {"APPLIANCE_WORKER_SWAP_HOST": "true", "APPLIANCE_WORKER_INITIAL_MODEL": entry.alias,
                "APPLIANCE_WORKER_MEMORY_BYTES": str(role.memory_bytes), "APPLIANCE_WORKER_ADVERTISE_URL": advertise}
    env = {"APPLIANCE_WORKER_MODEL_PATH": entry.path, "APPLIANCE_WORKER_MODEL_ALIAS": entry.alias,
           "APPLIANCE_WORKER_ALLOWED_SHA256": entry.sha256,
           "APPLIANCE_WORKER_SLOTS": str(config.slots_or_default), "APPLIANCE_WORKER_ADVERTISE_URL": advertise}
    if config.n_ctx is not None:
        env["APPLIANCE_WORKER_N_CTX"] = str(config.n_ctx)
    return env


# compose.yaml's x-appliance-env and x-worker-env, for the worker services it does not define.
_WORKER_ENV = {
    "APPLIANCE_DATA_DIR": "/data",
    "APPLIANCE_LOG_LEVEL": "${APPLIANCE_LOG_LEVEL:-INFO}",
    "APPLIANCE_LOG_JSON": "true",
    "APPLIANCE_INTERNAL_TOKEN":
        "${APPLIANCE_INTERNAL_TOKEN:?set APPLIANCE_INTERNAL_TOKEN in .env (openssl rand -hex 32)}",
    "APPLIANCE_WORKER_HOST": "0.0.0.0",  # noqa: S104 - inside the container, on the internal network
    "APPLIANCE_WORKER_PORT": str(_PORT),
    "APPLIANCE_WORKER_N_GPU_LAYERS": "0",
    "APPLIANCE_WORKER_REDIS_URL": "redis://redis:6379/0",
    "APPLIANCE_WORKER_REDIS_PASSWORD_FILE": "/run/secrets/redis_worker",
}


def _worker_service(env: dict[str, str]) -> dict[str, Any]:
    """compose.yaml's ``x-inference`` worker (without its build: inference-1 builds the image)."""
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{_PORT}/health', timeout=3)"
    return {
        "image": "${APPLIANCE_IMAGE_PREFIX:-llm-appliance}/inference:${APPLIANCE_VERSION:-latest}",
        "command": ["python", "-m", "inference"],
        "user": "${APPLIANCE_UID:-10001}:${APPLIANCE_GID:-10001}",
        "restart": "unless-stopped",
        "stop_grace_period": "90s",
        "logging": {"driver": "json-file", "options": {"max-size": "${APPLIANCE_LOG_MAX_SIZE:-20m}",
                                                       "max-file": "${APPLIANCE_LOG_MAX_FILE:-5}"}},
        "networks": ["internal"],
        "volumes": ["${APPLIANCE_DATA_PATH:-./data}/models:/data/models:ro"],
        "secrets": ["redis_worker"],
        "depends_on": {"redis": {"condition": "service_healthy"}},
        "healthcheck": {"test": ["CMD", "python", "-c", probe], "interval": "10s", "timeout": "5s", "retries": 3,
                        "start_period": "180s"},
        "environment": {**_WORKER_ENV, **env},
    }


def render_override(plan: ModelPlan, defined: int) -> str:
    """The generated compose file (JSON, which is YAML) for ``plan``'s workers; ``defined``: how many worker
    services compose.yaml itself has (those are only given their model)."""
    services: dict[str, Any] = {}
    for index, role in enumerate(plan.roles, start=1):
        env = _env(role, index)
        services[f"inference-{index}"] = {"environment": env} if index <= defined else _worker_service(env)
    header = "# Generated by `appliance up|models --runtime compose` from the model catalogue; do not edit.\n"
    return header + json.dumps({"services": services}, indent=2, sort_keys=True) + "\n"


# -- applying it -------------------------------------------------------------------------------------------

_REDIS_CLI = 'REDISCLI_AUTH="$(cat /run/secrets/redis_admin)" exec redis-cli --no-auth-warning --user admin "$@"'


def _redis(rt: ComposeRuntime, *args: str) -> str:
    """One redis-cli command as the admin user inside the Redis container (arguments never pass a shell)."""
    return rt.exec("redis", "sh", "-c", _REDIS_CLI, "redis-cli", *args)


def internal_token(rt: ComposeRuntime) -> str:
    """The token the containers hold (APPLIANCE_INTERNAL_TOKEN of the environment or .env, else the file)."""
    return (os.environ.get("APPLIANCE_INTERNAL_TOKEN") or rt._dotenv().get("APPLIANCE_INTERNAL_TOKEN")
            or rt.settings.resolved_internal_token())


def publish(rt: ComposeRuntime, plan: ModelPlan | None) -> None:
    """Make the catalogue in the Redis container exactly ``plan.entries`` (signed, contract C1)."""
    from appliance.core.model_catalogue import CATALOGUE_KEY, encode_entry

    if plan is None:
        return
    token = internal_token(rt)
    for entry in plan.entries:
        _redis(rt, "HSET", CATALOGUE_KEY, entry.alias, encode_entry(token, entry).decode())
    wanted = {e.alias for e in plan.entries}
    for alias in _redis(rt, "HKEYS", CATALOGUE_KEY).split():
        if alias not in wanted:
            _redis(rt, "HDEL", CATALOGUE_KEY, alias)


def override_path(rt: ComposeRuntime) -> Path:
    return rt.settings.run_dir.resolve() / OVERRIDE


def written_workers(rt: ComposeRuntime) -> dict[str, dict[str, str]]:
    """Worker service -> its model environment, as the generated file has them (empty: none generated)."""
    try:
        text = override_path(rt).read_text()
        services = json.loads(text.split("\n", 1)[1])["services"]
    except (OSError, ValueError, KeyError, IndexError):
        return {}
    return {name: dict(body.get("environment") or {}) for name, body in services.items()}


def write_override(rt: ComposeRuntime, plan: ModelPlan | None, defined: int) -> None:
    path = override_path(rt)
    if plan is None or plan.legacy:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_override(plan, defined))
    tmp.replace(path)


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def apply_plan(rt: ComposeRuntime, plan: ModelPlan, before: dict[str, dict[str, str]], *,
               publish_first: bool) -> tuple[list[str], list[str]]:
    """Move the running worker services to ``plan``: new ones start, those whose model changed are recreated
    one at a time (compose stops the old container gracefully: it withdraws, drains and finishes its running
    requests), those no longer planned stop the same way; (started or moved, stopped)."""
    running = {name for name, info in rt.containers().items() if info.get("State", {}).get("Running")}
    defined = rt.defined_workers()
    old_names = set(before) or {w for w in running if w.startswith("inference-")}
    if publish_first:
        publish(rt, plan)
    write_override(rt, plan, defined)
    after = written_workers(rt)
    wanted = set(after) or {f"inference-{i}" for i in range(1, len(plan.roles) + 1)}
    changed = sorted((n for n in wanted if n in old_names and after.get(n, {}) != before.get(n, {})), key=_index)
    started = sorted((n for n in wanted if n not in old_names or n not in running), key=_index)
    for name in started:
        rt.compose("up", "-d", "--no-deps", name)
        rt.wait_healthy([name])
    for name in changed:
        if name in started:
            continue
        rt.log(f"moving    {name} (drained, then recreated on its new model)")
        rt.compose("up", "-d", "--no-deps", "--force-recreate", "-t", "90", name)
        rt.wait_healthy([name])
    stopped = sorted((n for n in old_names if n not in wanted and n in running), key=_index)
    containers = rt.containers()
    for name in stopped:
        container = containers.get(name, {}).get("Id")
        if container:
            rt.log(f"stopping  {name} (drains first)")
            rt.docker.run("stop", "-t", "90", container, timeout=150)
            rt.docker.run("rm", "-f", container, check=False)
    if not publish_first:
        publish(rt, plan)
    return started + [n for n in changed if n not in started], stopped
