"""Read models. `base` is the framework contract; the other modules are the ledger's projections."""
