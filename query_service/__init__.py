"""The query side: projects events from RabbitMQ into MongoDB read models, serves them over HTTP."""
