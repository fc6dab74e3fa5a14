"""The HTTP API over the read models (stateless; scale it freely). OpenAPI at /docs.

The framework's part: the app factory (`app`), liveness/readiness/metrics (`probes`), the admin
API for rebuilds (`admin`), read-your-writes waits (`freshness`), limits and timing middleware,
the bearer token (`auth`) and the error bodies (`errors`). The routes over a domain's read
models come from the domain (`QueryDomain.routes`), built with `dependencies` and `freshness`.
"""
