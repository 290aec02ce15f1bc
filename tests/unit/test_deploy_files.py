"""The deployment files name the same ports, settings and paths as the code, so they cannot drift apart.

deploy/nginx.conf is also run for real by tests/e2e/test_replicas_e2e.py; these checks cover compose and Kubernetes,
which need Docker or a cluster to run.
"""

import re
from pathlib import Path

import yaml

from service.app import Graft
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {f"GRAFT_{name.upper()}" for name in Settings.model_fields}
HTTP_PORT = Graft.config["http"]["port"]
GRPC_PORT = Settings.model_fields["grpc_port"].default


def compose() -> dict:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def graft_services() -> dict[str, dict]:
    return {name: service for name, service in compose()["services"].items() if name.startswith("graft-")}


def kubernetes(kind: str) -> dict:
    documents = yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "graft.yaml").read_text())
    return next(document for document in documents if document["kind"] == kind)


def graft_container() -> dict:
    return kubernetes("Deployment")["spec"]["template"]["spec"]["containers"][0]


def bento_env() -> dict[str, str]:
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    return {env["name"]: env["value"] for env in bentofile["envs"]}


def test_every_setting_the_deployment_files_give_is_one_the_service_reads():
    compose_names = {name for service in graft_services().values() for name in service["environment"]}
    kubernetes_names = {env["name"] for env in graft_container()["env"]}
    assert compose_names <= SETTINGS, compose_names - SETTINGS
    assert kubernetes_names <= SETTINGS, kubernetes_names - SETTINGS
    assert set(bento_env()) <= SETTINGS


def test_ports_are_the_ones_the_service_listens_on():
    for service in graft_services().values():
        assert service["environment"]["GRAFT_GRPC_PORT"] == str(GRPC_PORT)
    container = graft_container()
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "http": HTTP_PORT,
        "grpc": GRPC_PORT,
    }
    service_ports = {port["name"]: port["port"] for port in kubernetes("Service")["spec"]["ports"]}
    assert service_ports == {"http": HTTP_PORT, "grpc": GRPC_PORT}
    assert {env["name"]: env.get("value") for env in container["env"]}["GRAFT_GRPC_PORT"] == str(GRPC_PORT)


def test_nginx_sends_to_every_compose_replica_on_the_service_ports():
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    http = set(re.findall(r"server (graft-\d+):" + str(HTTP_PORT), nginx))
    grpc = set(re.findall(r"server (graft-\d+):" + str(GRPC_PORT), nginx))
    assert http == grpc == set(graft_services())
    published = {mapping.split(":")[1] for mapping in compose()["services"]["nginx"]["ports"]}
    assert published == set(re.findall(r"listen (\d+)", nginx))


def test_the_data_volume_is_mounted_where_the_service_keeps_its_data():
    data_dir = bento_env()["GRAFT_DATA_DIR"]
    for service in graft_services().values():
        assert service["environment"]["GRAFT_DATA_DIR"] == data_dir
        assert any(volume.endswith(f":{data_dir}") for volume in service["volumes"])
    container = graft_container()
    assert {env["name"]: env.get("value") for env in container["env"]}["GRAFT_DATA_DIR"] == data_dir
    assert [mount["mountPath"] for mount in container["volumeMounts"]] == [data_dir]
    assert kubernetes("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_probes_use_the_health_routes_and_the_grace_outlasts_the_drain():
    container = graft_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    grace = float({env["name"]: env.get("value") for env in container["env"]}["GRAFT_SHUTDOWN_GRACE_S"])
    assert kubernetes("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    for service in graft_services().values():
        assert float(service["stop_grace_period"].removesuffix("s")) > float(
            service["environment"]["GRAFT_SHUTDOWN_GRACE_S"]
        )
