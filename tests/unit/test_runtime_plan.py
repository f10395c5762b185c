import configparser
import json
from pathlib import Path

import pytest

from appliance.runtime.local.prometheus_conf import (
    WORKER_TARGETS_FILE,
    render_prometheus_conf,
    render_worker_targets,
    scrape_targets,
)
from appliance.runtime.local.supervisor_conf import render_supervisor_conf
from appliance.runtime.plan import STAGES, build_plan
from appliance.runtime.settings import RuntimeSettings


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
        # crashes restart; a configuration error (exit 2) does not, and fast failures stop after 3 tries
        assert parser.get(section, "autorestart") == "unexpected"
        assert parser.get(section, "exitcodes") == "2"
        assert parser.get(section, "startretries") == "3"
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
    from appliance.core.redis_auth import ensure_redis_users
    from inference.settings import WorkerSettings

    ensure_redis_users(settings.data_dir.resolve())  # `appliance up` writes the Redis users before starting
    worker = next(p for p in build_plan(settings, tmp_path / "m.gguf") if p.name == "inference-2")
    for key, value in worker.env.items():
        monkeypatch.setenv(key, value)
    parsed = WorkerSettings()
    assert parsed.redis_url == f"redis://127.0.0.1:{settings.redis_port}/0"  # no password in the URL
    assert parsed.redis_login()["username"] == "worker" and parsed.redis_login()["password"]
    assert parsed.resolved_advertise_url() == "http://127.0.0.1:9202" == worker.health_url.removesuffix("/health")
    # supervisord must not kill a worker while it withdraws and lets the balancer drain it
    assert worker.stop_wait_s > parsed.withdraw_grace_s + 30
    # ... nor while it finishes a long generation: its own drain is the runtime's, and supervisord waits longer
    assert parsed.shutdown_drain_s == settings.drain_s
    assert worker.stop_wait_s > parsed.withdraw_grace_s + parsed.shutdown_drain_s


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


def _toml(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))
    return path


def test_the_worker_table_names_the_model_and_flags_override_it(
    settings: RuntimeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.runtime.local import LocalRuntime

    own = tmp_path / "llama.gguf"
    own.write_bytes(b"GGUF")
    config = _toml(tmp_path, f'[worker]\nmodel_path = "{own}"\nmodel_alias = "my-llama"\nslots = 3\n', monkeypatch)
    served = LocalRuntime(settings).served_model()
    assert (served.model_path, served.model_alias, served.worker_slots) == (own, "my-llama", 3)
    worker = next(p for p in build_plan(served, own) if p.name == "inference-1")
    assert worker.env["APPLIANCE_WORKER_MODEL_PATH"] == str(own)
    assert worker.env["APPLIANCE_WORKER_MODEL_ALIAS"] == "my-llama"
    assert worker.env["APPLIANCE_WORKER_SLOTS"] == "3"
    assert worker.env["APPLIANCE_CONFIG"] == str(config)  # services read the admin's file wherever they run

    other = tmp_path / "Other-Model-Q4.gguf"
    other.write_bytes(b"GGUF")
    flagged = LocalRuntime(settings.model_copy(update={"model_path": other, "worker_slots": 2})).served_model()
    assert (flagged.model_path, flagged.worker_slots) == (other, 2)
    assert flagged.model_alias == "my-llama"  # the file's alias still applies; --served-name would override it
    _toml(tmp_path, f'[worker]\nmodel_path = "{other}"\n', monkeypatch)
    assert LocalRuntime(settings).served_model().model_alias == "Other-Model-Q4"  # no alias: the file name


def test_a_missing_model_file_is_named(
    settings: RuntimeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.runtime.local import LocalRuntime
    from appliance.runtime.protocol import RuntimeFailure

    _toml(tmp_path, '[worker]\nmodel_path = "/nowhere/x.gguf"\n', monkeypatch)
    with pytest.raises(RuntimeFailure, match=r"/nowhere/x.gguf \(from \[worker\] model_path\)"):
        LocalRuntime(settings).served_model()


def test_shared_fields_name_their_shared_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.core.settings import ConfigError, load_settings
    from inference.settings import WorkerSettings

    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, 'log_level = "LOUD"\n[worker]\nslots = 0\n', monkeypatch)
    with pytest.raises(ConfigError) as caught:
        load_settings(WorkerSettings)
    message = str(caught.value)
    assert "env APPLIANCE_LOG_LEVEL " in message and "APPLIANCE_WORKER_LOG_LEVEL" not in message
    assert "env APPLIANCE_WORKER_SLOTS or [worker] slots" in message


def test_tls_flags_reach_the_gateway(settings: RuntimeSettings, tmp_path: Path) -> None:
    lan = settings.model_copy(update={"tls": True, "gateway_host": "192.0.2.10", "tls_names": ["chat.corp"]})
    gateway = next(p for p in build_plan(lan, tmp_path / "m.gguf") if p.name == "gateway")
    assert gateway.env["APPLIANCE_GATEWAY_HOST"] == "192.0.2.10"
    assert gateway.env["APPLIANCE_GATEWAY_TLS_SELF_SIGNED"] == "true"
    assert {"192.0.2.10", "chat.corp", "localhost"} <= set(gateway.env["APPLIANCE_GATEWAY_TLS_NAMES"].split(","))
    assert gateway.health_url == "https://192.0.2.10:8000/healthz"  # bound to one address: probed there
    assert gateway.stop_wait_s > lan.drain_s  # supervisord lets the gateway drain long streams first
    assert gateway.env["APPLIANCE_GATEWAY_SHUTDOWN_DRAIN_S"] == str(lan.drain_s)
    others = [p for p in build_plan(lan, tmp_path / "m.gguf") if p.stage != "gateway"]  # gateway and stand-in
    assert all(p.env.get("APPLIANCE_WORKER_HOST", "127.0.0.1") == "127.0.0.1" for p in others)
    assert "192.0.2.10" not in str([p.env for p in others])  # internal services stay on loopback

    own = RuntimeSettings(data_dir=tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    assert own.tls and own.scheme == "https"
    gateway = next(p for p in build_plan(own, tmp_path / "m.gguf") if p.name == "gateway")
    assert gateway.env["APPLIANCE_GATEWAY_TLS_CERT"] == str(tmp_path / "c.pem")
    assert "APPLIANCE_GATEWAY_TLS_SELF_SIGNED" not in gateway.env


def test_self_signed_certificate_covers_the_served_names(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from gateway.tls import self_signed_pair

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = self_signed_pair(tmp_path, ["chat.corp", "192.0.2.10"])
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("DNS:chat.corp", "IP Address:192.0.2.10", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in text
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    before = cert.read_bytes()
    assert self_signed_pair(tmp_path, ["192.0.2.10", "chat.corp"])[0].read_bytes() == before  # same names: kept
    self_signed_pair(tmp_path, ["chat.corp", "192.0.2.11"])
    assert cert.read_bytes() != before  # a new address: a new certificate


def test_up_flags_are_remembered_until_reset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `up --model/--served-name/--tls/--host` was told, a later `scale`/`keys` (a bare load()) uses."""
    from appliance.cli.context import forget, load, remember, state_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    model = tmp_path / "llama.gguf"
    given = {"model_path": model, "model_alias": "llama", "tls": True, "gateway_host": "0.0.0.0", "workers": None}
    settings = load(**given)
    remember(settings, given)
    assert "workers" not in json.loads(state_file(settings).read_text())  # only what was given
    later = load()
    assert (later.model_path, later.model_alias, later.tls, later.gateway_host) == (model, "llama", True, "0.0.0.0")
    assert later.gateway_local_url.startswith("https://127.0.0.1:")
    assert load(gateway_host="192.0.2.7").gateway_host == "192.0.2.7"  # a flag given again wins
    forget(later)  # `appliance up --reset`
    assert (load().model_path, load().tls) == (None, False)
