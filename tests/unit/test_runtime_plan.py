import configparser
from pathlib import Path

import pytest

from appliance.runtime.plan import STAGES, build_plan
from appliance.runtime.prometheus_conf import (
    WORKER_TARGETS_FILE,
    render_prometheus_conf,
    render_worker_targets,
    scrape_targets,
)
from appliance.runtime.settings import RuntimeSettings
from appliance.runtime.supervisor_conf import render_supervisor_conf


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RuntimeSettings:
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return RuntimeSettings(data_dir=tmp_path / "data", workers=3, worker_base_port=9201)


def test_programs_start_in_dependency_order(settings: RuntimeSettings, tmp_path: Path) -> None:
    plan = build_plan(settings, tmp_path / "m.gguf")
    stages = [STAGES.index(p.stage) for p in plan]
    assert stages == sorted(stages)
    names = [p.name for p in plan]
    assert names[:5] == ["redis", "rag", "inference-1", "inference-2", "inference-3"]
    assert names.index("balancer") < names.index("gateway")


def test_wiring_between_services(settings: RuntimeSettings, tmp_path: Path) -> None:
    plan = {p.name: p for p in build_plan(settings, tmp_path / "m.gguf")}
    assert "APPLIANCE_BALANCER_WORKERS" not in plan["balancer"].env  # membership comes from the registry
    redis_url = plan["balancer"].env["APPLIANCE_BALANCER_REDIS_URL"]
    assert all(plan[f"inference-{i}"].env["APPLIANCE_WORKER_REDIS_URL"] == redis_url for i in (1, 2, 3))
    assert plan["inference-2"].env["APPLIANCE_WORKER_PORT"] == "9202"
    assert plan["gateway"].env["APPLIANCE_GATEWAY_BALANCER_URL"] == "http://127.0.0.1:8100"
    assert all(p.env["APPLIANCE_DATA_DIR"] == str(settings.data_dir.resolve()) for p in plan.values())
    assert "--appendonly" in plan["redis"].argv and "everysec" in plan["redis"].argv


def test_supervisor_conf_parses_and_autostarts_nothing(settings: RuntimeSettings, tmp_path: Path) -> None:
    plan = build_plan(settings, tmp_path / "100%.gguf")
    text = render_supervisor_conf(plan, tmp_path / "run", tmp_path / "logs", tmp_path)
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    programs = [s for s in parser.sections() if s.startswith("program:")]
    assert len(programs) == len(plan)
    for section in programs:
        assert parser.get(section, "autostart") == "false"
        assert parser.get(section, "autorestart") == "true"
    assert "100%%.gguf" in parser.get("program:inference-1", "environment")


def test_env_values_with_quotes_are_refused(settings: RuntimeSettings, tmp_path: Path) -> None:
    plan = build_plan(settings.model_copy(update={"model_alias": 'bad"alias'}), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="quotes"):
        render_supervisor_conf(plan, tmp_path, tmp_path, tmp_path)


def test_prometheus_scrapes_every_worker(settings: RuntimeSettings, tmp_path: Path) -> None:
    import json

    config = json.loads(render_prometheus_conf(settings, tmp_path))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(scrape_targets(settings))
    assert jobs["gateway"]["static_configs"][0]["targets"] == [f"127.0.0.1:{settings.gateway_port}"]
    # workers are discovered from a file that `appliance scale` rewrites: no Prometheus reload needed
    (sd,) = jobs["inference"]["file_sd_configs"]
    assert sd["files"] == [str((settings.run_dir / WORKER_TARGETS_FILE).resolve())]
    (group,) = json.loads(render_worker_targets(settings))
    assert group["targets"] == ["127.0.0.1:9201", "127.0.0.1:9202", "127.0.0.1:9203"]
    fewer = json.loads(render_worker_targets(settings.model_copy(update={"workers": 1})))
    assert fewer[0]["targets"] == ["127.0.0.1:9201"]


def test_managed_backups_run_as_a_program(settings: RuntimeSettings, tmp_path: Path) -> None:
    plan = build_plan(
        settings.model_copy(update={"backup_every": "6h", "backup_offsite": tmp_path / "nas"}), tmp_path / "m.gguf"
    )
    backup = plan[-1]
    assert backup.name == "backup" and backup.stage == "maintenance"
    assert backup.argv[-6:] == ["--every", "6h", "--keep", "7", "--offsite", str(tmp_path / "nas")]
    assert "backup" not in [p.name for p in build_plan(settings, tmp_path / "m.gguf")]


def test_workers_register_at_the_url_the_runtime_waits_for(
    settings: RuntimeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.settings import WorkerSettings

    worker = next(p for p in build_plan(settings, tmp_path / "m.gguf") if p.name == "inference-2")
    for key, value in worker.env.items():
        monkeypatch.setenv(key, value)
    parsed = WorkerSettings()
    assert parsed.redis_url == f"redis://127.0.0.1:{settings.redis_port}/0"
    assert parsed.resolved_advertise_url() == "http://127.0.0.1:9202" == worker.health_url.removesuffix("/health")
    # supervisord must not kill a worker while it withdraws and lets the balancer drain it
    assert worker.stop_wait_s > parsed.withdraw_grace_s + 30


def test_scaling_rewrites_only_worker_programs(settings: RuntimeSettings, tmp_path: Path) -> None:
    """`appliance scale` reloads supervisord with this config: any other changed section would restart."""

    def sections(workers: int) -> dict[str, dict[str, str]]:
        plan = build_plan(settings.model_copy(update={"workers": workers}), tmp_path / "m.gguf")
        parser = configparser.RawConfigParser()
        parser.read_string(render_supervisor_conf(plan, tmp_path / "run", tmp_path / "logs", tmp_path))
        return {name: dict(parser.items(name)) for name in parser.sections()}

    one, five = sections(1), sections(5)
    assert set(five) - set(one) == {f"program:inference-{i}" for i in range(2, 6)}
    for name, section in one.items():
        if not name.startswith("program:inference-"):
            assert five[name] == section, name
