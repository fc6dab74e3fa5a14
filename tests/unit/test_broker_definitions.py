"""The broker docker-compose runs: its users and their passwords, that the services use them, and
its message size limit (the same in the Kubernetes example, consistent with the services').
The command authorization both set names these users: the service and admin users privileged,
never the client one.

The permissions themselves are proven against a real broker by the tests of
`scripts/rabbitmq-users` (test_broker_permissions.py, test_query_permissions.py), which reads
them from the same definitions file.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml  # type: ignore[import-untyped]

from command_service.settings import CommandServiceSettings
from query_service.projections.envelope import MAX_BODY_BYTES
from shared.amqp import TRUNCATED_BODY_BYTES

ROOT = Path(__file__).parents[2]
DEFINITIONS = ROOT / "scripts" / "docker" / "rabbitmq" / "definitions.json"
CONFIG = ROOT / "scripts" / "docker" / "rabbitmq" / "rabbitmq.conf"
COMPOSE = ROOT / "docker-compose.yml"
K8S_BROKER = ROOT / "deploy" / "k8s" / "base" / "rabbitmq.example.yaml"
K8S_CONFIG = ROOT / "deploy" / "k8s" / "base" / "config.yaml"


def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return loaded


def password_matches(user: dict[str, Any], password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_each_role_has_a_user_with_its_documented_development_password() -> None:
    users = {user["name"]: user for user in definitions()["users"]}
    assert set(users) == {"cqrs-admin", "cqrs-command", "cqrs-query", "cqrs-client"}
    for name, user in users.items():
        assert password_matches(user, f"{name}-dev"), name
        assert not password_matches(user, "guest"), name
    assert users["cqrs-admin"]["tags"] == ["administrator"]
    assert all(not users[name]["tags"] for name in ("cqrs-command", "cqrs-query", "cqrs-client"))


def test_only_the_admin_may_do_everything() -> None:
    permissions = {p["user"]: p for p in definitions()["permissions"]}
    assert set(permissions) == {"cqrs-admin", "cqrs-command", "cqrs-query", "cqrs-client"}
    for name, permission in permissions.items():
        wide = [k for k in ("configure", "write", "read") if permission[k] == ".*"]
        assert wide == ([] if name != "cqrs-admin" else ["configure", "write", "read"]), name


def test_the_services_in_compose_connect_as_their_own_users() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    users = {user["name"]: user for user in definitions()["users"]}
    expected = {"command-service": "cqrs-command", "query-service": "cqrs-query"}
    for service, user in expected.items():
        url = urlsplit(compose["services"][service]["environment"]["CQRS_AMQP_URL"])
        assert url.username == user
        assert url.password is not None
        assert password_matches(users[user], url.password)


def test_compose_loads_the_definitions_at_boot() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {
        target: source
        for source, target, *_ in (v.split(":") for v in compose["services"]["rabbitmq"]["volumes"])
    }
    loaded = CONFIG.read_text().split("load_definitions =")[1].split()[0]
    assert mounts[loaded] == "./scripts/docker/rabbitmq/definitions.json"
    assert mounts["/etc/rabbitmq/rabbitmq.conf"] == "./scripts/docker/rabbitmq/rabbitmq.conf"


def config_values(text: str) -> dict[str, str]:
    """`key = value` lines of a rabbitmq.conf (sysctl format), comments left out."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line.split("#")[0])
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_broker_limits_message_size_the_same_in_compose_and_kubernetes() -> None:
    compose = config_values(CONFIG.read_text())
    config_map = yaml.safe_load(K8S_BROKER.read_text())
    (kubernetes_conf,) = config_map["data"].values()
    assert compose["max_message_size"] == config_values(kubernetes_conf)["max_message_size"]


def test_the_message_size_limit_fits_commands_events_and_dead_letters() -> None:
    limit = int(config_values(CONFIG.read_text())["max_message_size"])
    commands = CommandServiceSettings.model_fields["max_message_bytes"].default
    # An oversized command still reaches the command service (answered `message_too_large`);
    # an event carries a command's data in an envelope, so it may be larger than the command.
    assert limit >= 2 * commands
    # A dead letter's copy of a body over the command limit is cut far below the broker's.
    assert TRUNCATED_BODY_BYTES <= commands < limit
    # Every event the broker admits is one the projector reads rather than parks as too large.
    assert limit <= MAX_BODY_BYTES


def test_compose_and_kubernetes_privilege_the_service_and_admin_users_only() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["command-service"]["environment"]
    config_map = yaml.safe_load(K8S_CONFIG.read_text())["data"]
    users = {user["name"]: user for user in definitions()["users"]}
    for where, env in (("docker-compose.yml", compose), ("config.yaml", config_map)):
        settings = CommandServiceSettings(
            authorization=env["CQRS_AUTHORIZATION"], privileged_users=env["CQRS_PRIVILEGED_USERS"]
        )
        assert settings.authorization == "on", where
        # Exactly the users that are no client: the command service's and the operators'.
        assert settings.privileged == {"cqrs-command", "cqrs-admin"}, where
        assert settings.privileged < set(users), where
    # Both say what the default says, so that leaving the keys out changes nothing.
    default = CommandServiceSettings()
    assert default.authorization == "on"
    assert default.privileged == {"cqrs-command", "cqrs-admin"}
