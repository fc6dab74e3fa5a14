"""The projection framework (the query side's core): what a projection and a read model are,
the versioned-document store they write into, one document per aggregate, replay batches, and
reading an event envelope. The domains' read models live in `query_service.domains`."""
