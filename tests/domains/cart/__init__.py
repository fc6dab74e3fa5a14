"""A shopping cart: a second domain beside the ledger, written only against the framework's
public parts. `CQRS_DOMAINS=ledger,tests.domains.cart` runs it; its modules are the ones the
loaders look for: `contracts` (commands and events, `contracts = DomainContracts(...)`),
`command` (the aggregate and who may send its commands), `query` (the read model and its
route)."""
