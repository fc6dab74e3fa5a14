"""The broker users docker-compose creates: their passwords, and that the services use them.

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

ROOT = Path(__file__).parents[2]
DEFINITIONS = ROOT / "scripts" / "docker" / "rabbitmq" / "definitions.json"
CONFIG = ROOT / "scripts" / "docker" / "rabbitmq" / "rabbitmq.conf"
COMPOSE = ROOT / "docker-compose.yml"


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
