"""Clients learn a domain's commands from its contracts module, named by `CQRS_DOMAINS`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shared import ledger
from shared.contracts import ContractsError, command_types, load_contracts

CART_CONTRACTS = """
    from shared.contracts import DomainContracts
    from shared.messages import Command, Event

    class {first}(Command):
        aggregate_type = "cart"
        sku: str
        quantity: int

    class {second}(Command):
        aggregate_type = "cart"

    class ItemAdded(Event):
        sku: str

    contracts = DomainContracts(name="{name}", commands=({first}, {second}), events=(ItemAdded,))
"""


def write_domain(root: Path, package: str, body: str) -> None:
    """A package of one's own, `<package>.contracts`, on the import path."""
    folder = root.joinpath(*package.split("."))
    folder.mkdir(parents=True)
    for parent in [folder, *folder.relative_to(root).parents][:-1]:
        (root / parent / "__init__.py").touch()
    (folder / "contracts.py").write_text(textwrap.dedent(body))


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_bare_name_is_a_shipped_domain_with_its_public_commands_only() -> None:
    (contracts,) = load_contracts(["ledger"])
    assert contracts is ledger.contracts
    commands = command_types([contracts])
    assert list(commands) == [c.type_name() for c in ledger.COMMANDS]
    assert commands["DepositMoney"].aggregate_type == "account"
    assert commands["RequestTransfer"].aggregate_type == "transfer"
    for internal in ledger.INTERNAL_COMMANDS:
        assert internal.type_name() not in commands


def test_a_dotted_name_is_a_package_of_ones_own(packages: Path) -> None:
    body = CART_CONTRACTS.format(name="cart", first="AddItem", second="EmptyCart")
    write_domain(packages, "acme_shop.cart", body)
    cart, shipped = load_contracts(["acme_shop.cart", "ledger"])
    assert cart.name == "cart" and shipped.name == "ledger"
    commands = command_types([cart, shipped])
    assert commands["AddItem"].aggregate_type == "cart"
    assert "OpenAccount" in commands


def test_two_domains_naming_one_command_type_is_a_clear_error(packages: Path) -> None:
    body = CART_CONTRACTS.format(name="cards", first="AddCard", second="OpenAccount")
    write_domain(packages, "acme_bank.cards", body)
    with pytest.raises(ContractsError) as raised:
        load_contracts(["ledger", "acme_bank.cards"])
    message = str(raised.value)
    assert "'OpenAccount'" in message and "'cards'" in message and "'ledger'" in message


def test_two_domains_naming_one_event_type_is_a_clear_error(packages: Path) -> None:
    for shop, first, second in (("a", "AddItem", "EmptyCart"), ("b", "PutItem", "ClearCart")):
        body = CART_CONTRACTS.format(name=f"cart_{shop}", first=first, second=second)
        write_domain(packages, f"shop_{shop}.cart", body)
    with pytest.raises(ContractsError, match="event type 'ItemAdded'"):
        load_contracts(["shop_a.cart", "shop_b.cart"])


def test_a_domain_that_cannot_be_imported_is_named(packages: Path) -> None:
    with pytest.raises(ContractsError, match=r"'no_such_domain'.*shared\.no_such_domain"):
        load_contracts(["no_such_domain"])
    with pytest.raises(ContractsError, match=r"acme_none\.cart\.contracts"):
        load_contracts(["acme_none.cart"])


def test_a_module_without_contracts_is_refused(packages: Path) -> None:
    write_domain(packages, "acme_empty.cart", "VALUE = 1\n")
    with pytest.raises(ContractsError, match=r"has no `contracts = DomainContracts"):
        load_contracts(["acme_empty.cart"])
