"""What both services run on: settings, logging, tracing, supervision, HTTP, message copies."""
