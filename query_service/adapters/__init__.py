"""Drivers at the edge: RabbitMQ topology and parking, MongoDB collections."""
