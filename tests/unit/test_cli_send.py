"""`cqrs send` knows the commands of the configured domains, not only the ledger's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cqrs_cli import app
from cqrs_cli.common import settings
from cqrs_cli.send_command import known_commands, parse_fields
from shared.ledger import DepositMoney, OpenAccount, RequestTransfer

CART = '''
from typing import Literal

from shared.contracts import DomainContracts
from shared.messages import Command


class AddItem(Command):
    """Put `quantity` of `sku` into the cart."""

    aggregate_type = "cart"
    sku: str
    quantity: int
    gift: bool = False
    size: Literal["S", "M", "L"] | None = None


contracts = DomainContracts(name="cart", commands=(AddItem,))
'''


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads `CQRS_DOMAINS` anew."""
    monkeypatch.delenv("CQRS_DOMAINS", raising=False)
    settings.cache_clear()
    known_commands.cache_clear()
    yield
    settings.cache_clear()
    known_commands.cache_clear()


@pytest.fixture
def cart_domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A domain of one's own, `acme_cart_cli.cart`, configured beside the ledger."""
    package = tmp_path / "acme_cart_cli" / "cart"
    package.mkdir(parents=True)
    (tmp_path / "acme_cart_cli" / "__init__.py").touch()
    (package / "__init__.py").touch()
    (package / "contracts.py").write_text(CART)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CQRS_DOMAINS", "ledger,acme_cart_cli.cart")
    return "acme_cart_cli.cart"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_values_are_read_as_the_fields_types_want_them() -> None:
    opened = parse_fields(["owner_id=1001", "currency=EUR", "initial_deposit=100"], OpenAccount)
    assert opened == {"owner_id": "1001", "currency": "EUR", "initial_deposit": 100}
    assert parse_fields(["amount=25", "currency=EUR"], DepositMoney) == {
        "amount": 25,
        "currency": "EUR",
    }
    ids = parse_fields(["from_account_id=1", "amount=5"], RequestTransfer)
    assert ids == {"from_account_id": "1", "amount": 5}
    # Fields the model does not have, and types not known at all: JSON, else a string.
    assert parse_fields(["note=[1, 2]", "who=bob"], DepositMoney) == {
        "note": [1, 2],
        "who": "bob",
    }
    assert parse_fields(["owner_id=42"], None) == {"owner_id": 42}


def test_a_domain_of_ones_own_is_read_by_its_field_types(cart_domain: str) -> None:
    model = known_commands()["AddItem"]
    fields = parse_fields(["sku=42", "quantity=3", "gift=true", "size=M"], model)
    assert fields == {"sku": "42", "quantity": 3, "gift": True, "size": "M"}


def test_help_lists_the_commands_of_every_configured_domain(cart_domain: str) -> None:
    code, output = invoke("send", "--help")
    assert code == 0
    assert "Commands of the domains ledger,acme_cart_cli.cart:" in output
    assert "AddItem (cart): sku, quantity, gift?, size?" in output
    assert "OpenAccount (account): owner_id, currency, initial_deposit?" in output
    assert "RequestTransfer (transfer)" in output
    assert "DebitForTransfer" not in output  # internal: the service refuses it from clients


def test_an_unknown_type_is_refused_with_the_known_ones(cart_domain: str) -> None:
    code, output = invoke("send", "AddItems", "sku=1")
    assert code == 1
    assert "unknown command type 'AddItems'" in output
    assert "AddItem (cart)" in output and "DepositMoney (account)" in output


def test_a_domain_that_cannot_be_loaded_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_DOMAINS", "ledger,acme_missing.cart")
    code, output = invoke("send", "DepositMoney", "amount=1")
    assert code == 1
    assert "acme_missing.cart.contracts" in output
    code, output = invoke("send", "--help")
    assert code == 0 and "acme_missing.cart.contracts" in output
