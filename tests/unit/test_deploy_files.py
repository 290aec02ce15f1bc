"""The deployment files describe the image graft ships and the settings it reads, so they cannot drift apart.

deploy/Containerfile is the source of truth for the image (its user, ports, data volume, health check), and
pyproject.toml's version for its tag; Settings for every GRAFT_* name and role. deploy/nginx.conf is also run for
real by tests/e2e/test_replicas_e2e.py; these checks cover compose and Kubernetes, which need a container engine
or a cluster to run.
"""

import re
import shlex
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from service.app import Graft
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SETTINGS = {f"GRAFT_{name.upper()}" for name in Settings.model_fields}
ROLES = set(typing.get_args(Settings.model_fields["role"].annotation))
HTTP_PORT = Graft.config["http"]["port"]
GRPC_PORT = Settings.model_fields["grpc_port"].default
IMAGE = "graft:" + tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# -- the image: deploy/Containerfile ------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """Its instructions as (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (DEPLOY / "Containerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def image_instruction(name: str) -> str:
    [value] = [arguments for instruction, arguments in containerfile() if instruction == name]
    return value


def image_env() -> dict[str, str]:
    pairs = [pair for instruction, text in containerfile() if instruction == "ENV" for pair in shlex.split(text)]
    return dict(pair.split("=", 1) for pair in pairs)


def image_user() -> tuple[int, int]:
    uid, gid = image_instruction("USER").split(":")
    return int(uid), int(gid)


def image_volume() -> str:
    [volume] = image_instruction("VOLUME").split()
    return volume


# -- compose --------------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def graft_services() -> dict[str, dict]:
    """The compose services that run graft's image, by name."""
    return {name: service for name, service in compose()["services"].items() if service["image"].startswith("graft")}


def role_of(service: dict) -> str:
    return service["environment"].get("GRAFT_ROLE", Settings.model_fields["role"].default)


# -- Kubernetes -----------------------------------------------------------------------------------------


def kubernetes_documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "graft.yaml").read_text()) if doc]


def kubernetes(kind: str) -> dict:
    [document] = [document for document in kubernetes_documents() if document["kind"] == kind]
    return document


def deployments() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in kubernetes_documents() if doc["kind"] == "Deployment"}


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    [graft] = pod(deployment)["containers"]
    return graft


def values(deployment: dict) -> dict[str, str | None]:
    """The container's environment; None for a value taken from elsewhere (a Secret)."""
    return {env["name"]: env.get("value") for env in container(deployment)["env"]}


# -- the checks ----------------------------------------------------------------------------------------


def test_every_deployment_runs_the_image_this_version_builds():
    assert graft_services() and deployments()
    for name, service in graft_services().items():
        assert service["image"] == IMAGE, name
    for name, deployment in deployments().items():
        assert container(deployment)["image"] == IMAGE, name


def test_every_setting_the_deployment_files_give_is_one_the_service_reads():
    compose_names = {name for service in graft_services().values() for name in service["environment"]}
    kubernetes_names = {name for deployment in deployments().values() for name in values(deployment)}
    image_names = {name for name in image_env() if name.startswith("GRAFT_")}
    assert compose_names <= SETTINGS, compose_names - SETTINGS
    assert kubernetes_names <= SETTINGS, kubernetes_names - SETTINGS
    assert image_names <= SETTINGS, image_names - SETTINGS
    bento_names = {env["name"] for env in yaml.safe_load((REPO / "bentofile.yaml").read_text())["envs"]}
    assert bento_names <= SETTINGS, bento_names - SETTINGS


def test_serving_and_training_replicas_are_both_deployed_with_valid_roles():
    roles = {name: role_of(service) for name, service in graft_services().items()}
    assert set(roles.values()) <= ROLES
    assert roles == {"graft-1": "serve", "graft-2": "serve", "graft-train": "train"}

    by_role = {values(deployment)["GRAFT_ROLE"]: deployment for deployment in deployments().values()}
    assert set(by_role) <= ROLES and set(by_role) == {"serve", "train"}
    assert by_role["serve"]["metadata"]["name"] == "graft-serve" and by_role["serve"]["spec"]["replicas"] == 2
    assert by_role["train"]["metadata"]["name"] == "graft-train" and by_role["train"]["spec"]["replicas"] == 1
    for role, deployment in by_role.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), role


def test_the_service_selects_the_serving_pods_only():
    selector = kubernetes("Service")["spec"]["selector"].items()
    for deployment in deployments().values():
        labels = deployment["spec"]["template"]["metadata"]["labels"].items()
        assert (selector <= labels) == (values(deployment)["GRAFT_ROLE"] != "train"), deployment["metadata"]["name"]


def test_ports_are_the_ones_the_image_exposes_and_the_service_listens_on():
    assert {int(port) for port in image_instruction("EXPOSE").split()} == {HTTP_PORT, GRPC_PORT}
    assert image_env()["GRAFT_GRPC_PORT"] == str(GRPC_PORT)
    for service in graft_services().values():
        assert service["environment"]["GRAFT_GRPC_PORT"] == str(GRPC_PORT)
    for deployment in deployments().values():
        ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
        assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT}
        assert values(deployment)["GRAFT_GRPC_PORT"] == str(GRPC_PORT)
    service_ports = {port["name"]: port["port"] for port in kubernetes("Service")["spec"]["ports"]}
    assert service_ports == {"http": HTTP_PORT, "grpc": GRPC_PORT}


def test_nginx_sends_to_every_serving_replica_and_never_to_the_training_one():
    nginx = (DEPLOY / "nginx.conf").read_text()
    http = set(re.findall(r"server (graft-\w+):" + str(HTTP_PORT), nginx))
    grpc = set(re.findall(r"server (graft-\w+):" + str(GRPC_PORT), nginx))
    serving = {name for name, service in graft_services().items() if role_of(service) != "train"}
    assert http == grpc == serving == {"graft-1", "graft-2"}
    published = {mapping.split(":")[1] for mapping in compose()["services"]["nginx"]["ports"]}
    assert published == set(re.findall(r"listen (\d+)", nginx))
    assert "ports" not in compose()["services"]["graft-train"]


def test_the_data_volume_is_mounted_where_the_image_keeps_its_data():
    data_dir = image_env()["GRAFT_DATA_DIR"]
    assert image_volume() == data_dir
    for service in graft_services().values():
        assert service["environment"]["GRAFT_DATA_DIR"] == data_dir
        assert any(volume.endswith(f":{data_dir}") for volume in service["volumes"])
    for deployment in deployments().values():
        assert values(deployment)["GRAFT_DATA_DIR"] == data_dir
        mounts = {mount["name"]: mount["mountPath"] for mount in container(deployment)["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod(deployment)["volumes"]}
        [data] = [name for name, path in mounts.items() if path == data_dir]
        claim = kubernetes("PersistentVolumeClaim")["metadata"]["name"]
        assert volumes[data]["persistentVolumeClaim"]["claimName"] == claim
    assert kubernetes("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_containers_run_as_the_image_user_on_a_read_only_root_writing_only_the_volume_and_tmp():
    uid, gid = image_user()
    assert uid != 0
    for name, service in graft_services().items():
        assert service["user"] == f"{uid}:{gid}", name
        assert service["read_only"] is True, name
        assert [entry.split(":")[0] for entry in service["tmpfs"]] == ["/tmp"], name
    for name, deployment in deployments().items():
        security = pod(deployment)["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid), name
        graft = container(deployment)["securityContext"]
        assert graft["readOnlyRootFilesystem"] is True and graft["allowPrivilegeEscalation"] is False, name
        assert graft["capabilities"]["drop"] == ["ALL"], name
        mounts = {mount["mountPath"]: mount["name"] for mount in container(deployment)["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod(deployment)["volumes"]}
        assert set(mounts) == {image_env()["GRAFT_DATA_DIR"], "/tmp"}, name
        assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_probes_use_the_health_routes_and_the_grace_outlasts_the_drain():
    assert "/livez" in image_instruction("HEALTHCHECK")
    for name, deployment in deployments().items():
        graft = container(deployment)
        assert graft["livenessProbe"]["httpGet"]["path"] == "/livez", name
        readiness = graft["readinessProbe"]["httpGet"]["path"]
        # /readyz gates prediction traffic; a training replica answers it 503 for as long as it runs
        assert readiness == ("/livez" if values(deployment)["GRAFT_ROLE"] == "train" else "/readyz"), name
        grace = float(values(deployment)["GRAFT_SHUTDOWN_GRACE_S"] or 0)
        assert pod(deployment)["terminationGracePeriodSeconds"] > grace, name
    for name, service in graft_services().items():
        grace = float(service["environment"]["GRAFT_SHUTDOWN_GRACE_S"])
        assert float(service["stop_grace_period"].removesuffix("s")) > grace, name


def test_every_pod_has_cpu_and_memory_requests_and_limits_and_torch_uses_its_cpus():
    for name, deployment in deployments().items():
        resources = container(deployment)["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[bound]), (name, bound)
        # torch counts the node's cores, not the CPU limit: without this it would run far more threads than it has
        assert values(deployment)["GRAFT_TORCH_THREADS"] == str(resources["limits"]["cpu"]), name


def test_no_secret_is_shipped_and_no_admin_key_is_written_down():
    assert "Secret" not in {document["kind"] for document in kubernetes_documents()}
    for service in graft_services().values():
        assert service["environment"]["GRAFT_ADMIN_KEY"].startswith("${GRAFT_ADMIN_KEY:?")  # required from outside
    for name, deployment in deployments().items():
        [admin] = [env for env in container(deployment)["env"] if env["name"] == "GRAFT_ADMIN_KEY"]
        assert "value" not in admin and admin["valueFrom"]["secretKeyRef"]["name"] == "graft", name
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        assert "change-me" not in text, path
        for value in re.findall(r"(?i)admin[-_]key\s*[:=]\s*(\S+)", text):
            assert value.startswith("$"), f"{path}: an admin key written down ({value}); take it from outside"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_role_is_a_value_settings_accepts(role):
    assert Settings(role=role).role == role
