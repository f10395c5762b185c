"""The worker's /health contract (appliance.core.worker_health.WorkerHealth): what the worker writes is what
the balancer reads."""

from __future__ import annotations

import msgspec
import pytest

from appliance.core.wire import ModelLimits
from appliance.core.worker_health import WorkerHealth, decode_worker_health, encode_worker_health


def test_a_loading_worker_publishes_its_status_and_model_only() -> None:
    raw = encode_worker_health(WorkerHealth(status="loading", model="m"))
    assert msgspec.json.decode(raw) == {"status": "loading", "model": "m"}
    assert not decode_worker_health(raw).ready
    failed = WorkerHealth(status="failed", model="m", error="no such file")
    assert decode_worker_health(encode_worker_health(failed)) == failed


def test_a_ready_worker_round_trips_with_its_limits_and_decode_mode() -> None:
    health = WorkerHealth(status="ok", model="m", slots_total=4, slots_busy=1, model_sha256="f" * 64, n_ctx=2048,
                          context_length=2048, max_tokens=512, max_choices=4, max_prompts=16,
                          decode={"mode": "fast", "kernels": {"flash_attn": True}})
    read = decode_worker_health(encode_worker_health(health))
    assert read == health and read.ready
    assert read.limits() == ModelLimits(context_length=2048, max_tokens=512, max_choices=4, max_prompts=16)


def test_fields_a_reader_does_not_know_are_ignored_and_missing_limits_are_none() -> None:
    read = decode_worker_health(b'{"status": "ok", "model": "m", "context_length": 512, "max_tokens": 0,'
                                b' "something_new": [1, 2]}')
    assert read.ready and read.limits() is None  # max_tokens 0: no limits known, the worker refuses alone
    older = decode_worker_health(b'{"status": "ok", "model": "m", "context_length": 512, "max_tokens": 64}')
    assert older.limits() == ModelLimits(context_length=512, max_tokens=64)


def test_a_field_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_worker_health(b'{"status": "ok", "model": "m", "slots_total": "four"}')
