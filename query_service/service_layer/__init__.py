"""Use cases of the query side, free of AMQP: project an event into the generations of the
read models that want it (projector), the read-model catalog and its generations (catalog),
and the blue-green rebuild (rebuild)."""
