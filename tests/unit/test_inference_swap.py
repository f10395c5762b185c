"""A swap host's refusals and its loading state (inference.swap), with a loader that never loads a model.

The real swap, the model and its prompt cache, is tests/integration/test_worker_swap.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from appliance.core.errors import APIError
from appliance.core.model_catalogue import CatalogueEntry
from inference.metrics import WorkerMetrics
from inference.model import LoadedModel, ModelRefused
from inference.service import WorkerService
from inference.settings import WorkerSettings
from inference.swap import ModelSwapper, entry_settings

ASYNC = pytest.mark.asyncio(loop_scope="session")

TOKEN = "swap-unit-test-token-padded-to-32-chars"
CODE = CatalogueEntry(alias="code", path="/models/code.gguf", sha256="c" * 64, size_bytes=1000, slots=2, n_ctx=512,
                      resident="on_demand", kv_bytes_per_token=10)


def settings(tmp_path: Path, **extra: object) -> WorkerSettings:
    return WorkerSettings(swap_host=True, redis_url="redis://127.0.0.1:1", internal_token=TOKEN,  # type: ignore[arg-type]
                          data_dir=tmp_path, **extra)


class Host:
    def __init__(self, tmp_path: Path, **extra: object) -> None:
        self.release = threading.Event()
        self.loading = threading.Event()
        self.announced: list[str | None] = []
        self.service = WorkerService(settings(tmp_path, **extra), WorkerMetrics("m"), self._load)
        self.swapper = ModelSwapper(self.service, self.service.metrics, self._read, self._announce)

    def _load(self, _: WorkerSettings) -> LoadedModel:
        self.loading.set()
        self.release.wait(10)
        raise ModelRefused("the file's sha256 is not the entry's")

    async def _read(self, alias: str) -> CatalogueEntry | None:
        return CODE if alias == "code" else None

    async def _announce(self, alias: str | None) -> None:
        self.announced.append(alias)


async def refusal(host: Host, alias: str) -> APIError:
    with pytest.raises(APIError) as refused:
        await host.swapper.swap(alias)
    return refused.value


@ASYNC
async def test_an_empty_host_says_so_and_refuses_generation(tmp_path: Path) -> None:
    host = Host(tmp_path)
    await host.swapper.start()
    status, health = host.service.health()
    assert (status, health.status, health.model, health.swap_host, health.loading) == (503, "empty", "", True, False)
    with pytest.raises(APIError) as refused, host.service.serving():
        pass
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]


@ASYNC
async def test_an_unknown_alias_is_404_and_a_busy_worker_409(tmp_path: Path) -> None:
    host = Host(tmp_path)
    await host.swapper.start()
    assert (await refusal(host, "nope")).code == "model_not_found"
    host.service.in_flight = 1  # a request being answered
    busy = await refusal(host, "code")
    assert (busy.status, busy.code) == (409, "worker_busy")


@ASYNC
async def test_while_loading_health_says_loading_and_requests_get_503_then_a_failed_load_leaves_it_empty(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path)
    await host.swapper.start()
    swap = asyncio.create_task(host.swapper.swap("code"))
    await asyncio.to_thread(host.loading.wait, 10)
    status, health = host.service.health()
    assert (status, health.status, health.model, health.loading) == (503, "loading", "code", True)
    assert host.announced == ["code"]  # balancers see it loading that model
    with pytest.raises(APIError) as refused:
        host.service.ready()
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    assert (await refusal(host, "code")).code == "worker_busy"  # one swap at a time
    host.release.set()
    with pytest.raises(APIError) as failed:
        await swap
    assert (failed.value.status, failed.value.code) == (500, "model_load_failed")
    status, health = host.service.health()
    assert (status, health.status, health.model) == (503, "empty", "")
    assert health.error is not None and "sha256" in health.error
    assert host.announced == ["code", None]


def test_the_entry_decides_file_slots_and_context_and_pins_its_sha256(tmp_path: Path) -> None:
    served = entry_settings(settings(tmp_path, slots=8, n_ctx=8192), CODE)
    assert (served.model_path, served.model_alias, served.slots, served.n_ctx) == (CODE.path, "code", 2, 512)
    assert served.allowed_sha256 == [CODE.sha256]


def test_the_workers_own_rules_refuse_an_entry(tmp_path: Path) -> None:
    with pytest.raises(APIError) as not_allowed:
        entry_settings(settings(tmp_path, allowed_sha256=["a" * 64]), CODE)
    assert not_allowed.value.status == 403
    with pytest.raises(APIError) as too_large:  # 1000 + 2 x 512 x 10 = 11240 bytes
        entry_settings(settings(tmp_path, memory_bytes=11239), CODE)
    assert too_large.value.code == "model_too_large" and "11240" in too_large.value.message
    assert entry_settings(settings(tmp_path, memory_bytes=11240), CODE).model_alias == "code"


def test_a_swap_host_needs_the_catalogue(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        WorkerSettings(swap_host=True, internal_token=TOKEN, data_dir=tmp_path)  # type: ignore[call-arg]
