"""The ledger's authorization policy: a client acts only on the accounts it owns.

Asked by the framework for client logins only (privileged logins, process managers' steps and
anonymous commands are settled before, see `command_service.service_layer.access_control`):

- A client may open an account only with `owner_id` equal to its login, and deposit into,
  withdraw from, freeze, unfreeze or close an account only when the account's `owner_id` is its
  login. On an account that does not exist yet the command goes on to the account, which
  answers as without a policy (`account_not_found`).
- A client may request a transfer only out of an account it owns (the source is loaded
  read-only); paying into anyone's account is allowed. A source that does not exist is nobody's,
  so the request is refused: otherwise the debit, issued later by the process manager, could
  meet an account opened meanwhile by someone else under that id.
"""

from __future__ import annotations

from command_service.domains.ledger.account import Account
from command_service.model.aggregate import Aggregate
from command_service.model.authorization import Actor, AggregateLoader, Forbidden
from shared.ledger import OpenAccount, RequestTransfer
from shared.messages import Command


async def owners_policy(
    actor: Actor, command: Command, aggregate: Aggregate, load: AggregateLoader
) -> None:
    """`authorize` for the ledger's commands (see the module)."""
    login = actor.name
    match command:
        case OpenAccount(owner_id=owner_id):
            if owner_id != login:
                raise Forbidden(f"{login} may open accounts only for owner_id {login}")
        case RequestTransfer(from_account_id=source_id):
            source = await load(Account, source_id)
            if source is None or source.owner_id != login:
                raise Forbidden(
                    f"{login} may transfer only out of its own accounts; {source_id} is not one"
                )
        case _ if isinstance(aggregate, Account):
            # A command on an account that does not exist is answered by the account.
            if aggregate.status != "new" and aggregate.owner_id != login:
                raise Forbidden(f"account {aggregate.id} is not owned by {login}")
        case _:
            raise Forbidden(f"{login} may not send {command.type_name()}")
