"""Use cases of the projector, free of AMQP: dispatch an event to the projections that want it."""
