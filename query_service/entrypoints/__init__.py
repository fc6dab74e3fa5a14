"""Ways in: the projector's AMQP consumer and the HTTP API."""
