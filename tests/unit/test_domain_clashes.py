"""Two domains that name the same thing stop the service at start, naming both and the name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar
from uuid import UUID

import pytest
from fastapi import APIRouter

from command_service.bootstrap import start
from command_service.domains import ledger as ledger_commands
from command_service.model.aggregate import Aggregate
from command_service.model.domain import CommandDomain
from command_service.model.domain import DomainSetupError as CommandDomainError
from command_service.service_layer.registry import CommandRegistry
from command_service.settings import CommandServiceSettings
from query_service.bootstrap import bootstrap
from query_service.domain import DomainSetupError, QueryDomain, read_models_of
from query_service.domains import ledger as ledger_queries
from query_service.entrypoints.api.app import create_app
from query_service.projections.document import DocumentReadModel, DocumentRules
from query_service.settings import QueryServiceSettings
from shared.messages import Command, Event

# Nothing listens here: a service that got past its checks would fail on connecting instead.
NOWHERE_AMQP = "amqp://nobody:x@127.0.0.1:1/"


def query_settings() -> QueryServiceSettings:
    return QueryServiceSettings(amqp_url=NOWHERE_AMQP, mongo_url="mongodb://127.0.0.1:1")


class DepositMoney(Command):
    """A command of another domain that happens to share the ledger's command's name."""

    aggregate_type = "piggy_bank"
    coins: int


class PiggyBankBroken(Event):
    pass


class AccountOpened(Event):
    """An event of another domain that shares the ledger's event's name."""


class PiggyBank(Aggregate):
    aggregate_type = "piggy_bank"
    commands = (DepositMoney,)
    events = (PiggyBankBroken,)

    def apply(self, event: Event) -> None:
        pass

    def decide(self, command: Command) -> Sequence[Event]:
        return [PiggyBankBroken()]


class Wallet(Aggregate):
    aggregate_type = "wallet"
    commands = ()
    events: ClassVar[tuple[type[Event], ...]] = (AccountOpened,)

    def apply(self, event: Event) -> None:
        pass

    def decide(self, command: Command) -> Sequence[Event]:
        return []


def commands_of(name: str, *aggregates: type[Aggregate]) -> CommandDomain:
    return CommandDomain(name=name, aggregates=aggregates)


class TestCommandSide:
    def test_two_domains_naming_one_command_type_are_refused(self) -> None:
        with pytest.raises(CommandDomainError) as refused:
            CommandRegistry.from_domains([ledger_commands.domain, commands_of("piggy", PiggyBank)])

        message = str(refused.value)
        assert "command type 'DepositMoney'" in message
        assert "'piggy'" in message and "'ledger'" in message

    def test_two_domains_naming_one_event_type_are_refused(self) -> None:
        with pytest.raises(CommandDomainError, match=r"event type 'AccountOpened'.*'ledger'"):
            CommandRegistry.from_domains([ledger_commands.domain, commands_of("wallet", Wallet)])

    def test_two_domains_naming_one_aggregate_type_are_refused(self) -> None:
        class Account(Wallet):
            aggregate_type = "account"
            events: ClassVar[tuple[type[Event], ...]] = (PiggyBankBroken,)

        with pytest.raises(CommandDomainError, match=r"aggregate type 'account'.*'ledger'"):
            CommandRegistry.from_domains([ledger_commands.domain, commands_of("bank", Account)])

    async def test_the_service_does_not_start(self) -> None:
        settings = CommandServiceSettings(
            amqp_url=NOWHERE_AMQP, postgres_dsn="postgresql://nobody@127.0.0.1:1/none"
        )

        with pytest.raises(CommandDomainError, match="DepositMoney"):
            await start(settings, domains=[ledger_commands.domain, commands_of("p", PiggyBank)])


def read_model(name: str, *, collection: str = "") -> DocumentReadModel[PiggyBankBroken]:
    return DocumentReadModel(
        DocumentRules(
            name=name,
            aggregate_type="piggy_bank",
            events=(PiggyBankBroken,),
            creating=PiggyBankBroken,
            created=lambda event, envelope: {},
            updated=lambda event, envelope: {},
            collection=collection,
        )
    )


def router_with(path: str, name: str) -> APIRouter:
    router = APIRouter()

    @router.get(path, name=name)
    async def read(account_id: UUID) -> dict[str, str]:
        return {}

    return router


def queries_of(name: str, *models: DocumentReadModel[PiggyBankBroken]) -> QueryDomain:
    return QueryDomain(name=name, read_models=models)


class TestQuerySide:
    def test_two_domains_naming_one_read_model_are_refused(self) -> None:
        with pytest.raises(DomainSetupError) as refused:
            read_models_of([ledger_queries.domain, queries_of("piggy", read_model("accounts"))])

        message = str(refused.value)
        assert "read model 'accounts'" in message
        assert "'piggy'" in message and "'ledger'" in message

    def test_two_read_models_sharing_a_collection_are_refused(self) -> None:
        clash = queries_of("piggy", read_model("banks", collection="transfers"))

        with pytest.raises(DomainSetupError, match=r"collection 'transfers'.*'ledger'"):
            read_models_of([ledger_queries.domain, clash])

    def test_one_domain_naming_two_read_models_alike_is_refused(self) -> None:
        with pytest.raises(DomainSetupError, match="read model 'banks'"):
            read_models_of([queries_of("piggy", read_model("banks"), read_model("banks"))])

    @pytest.mark.parametrize(
        ("path", "name", "clash"),
        [
            ("/accounts/{account_id}", "piggy_account", "GET /accounts/{account_id}"),
            ("/piggy/{account_id}", "account", "route name 'account'"),
            ("/readyz", "piggy_ready", "GET /readyz"),
        ],
    )
    def test_a_route_another_domain_or_the_framework_serves_is_refused(
        self, path: str, name: str, clash: str
    ) -> None:
        piggy = QueryDomain(name="piggy", read_models=(), routes=router_with(path, name))

        with pytest.raises(DomainSetupError) as refused:
            create_app(query_settings(), domains=[ledger_queries.domain, piggy])

        assert clash in str(refused.value)
        assert "'piggy'" in str(refused.value)

    async def test_the_service_does_not_start(self) -> None:
        clashes = [
            queries_of("piggy", read_model("accounts")),
            QueryDomain(
                name="piggy",
                read_models=(),
                routes=router_with("/accounts/{account_id}", "piggy_account"),
            ),
        ]
        for clash in clashes:
            with pytest.raises(DomainSetupError, match="accounts"):
                await bootstrap(query_settings(), domains=[ledger_queries.domain, clash])
