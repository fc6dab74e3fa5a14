"""The query service's settings (`CQRS_*` environment variables), read once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from cqrs_runtime.settings import CommonSettings


class QueryServiceSettings(CommonSettings):
    """Settings of the query service (projector and HTTP API)."""

    mongo_url: str = Field(
        default="mongodb://127.0.0.1:27017/?directConnection=true",
        description="MongoDB, credentials and TLS options included",
    )
    mongo_db: str = Field(default="cqrs", description="database of the read models")
    http_host: str = Field(default="127.0.0.1", description="where the API listens")
    http_port: int = Field(default=8000, ge=0, le=65_535, description="the API's port")
    http_request_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="a request not answered by then gets 503 and is cancelled; above "
        "`CQRS_READ_WAIT_SECONDS`",
    )
    http_max_concurrency: int = Field(
        default=256,
        ge=1,
        description="requests served at once by one replica, the probes not counted; more get "
        "503 at once",
    )
    http_header_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="a connection that has not sent a whole request head this long after it "
        "opened (or after its last response) is closed",
    )
    http_max_body_bytes: int = Field(
        default=16_384,
        ge=0,
        le=16_777_216,
        description="a larger request body gets 413 before any route or token check reads it",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="the bearer token the API requires (not on `/healthz`, `/readyz`, "
        "`/metrics`, the docs); unset: no authentication",
    )
    api_token_file: Path | None = Field(
        default=None,
        description="a file holding the API token, read at start (stripped); not with "
        "`CQRS_API_TOKEN`",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_api_token_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("api_token_file") in (None, ""):
            return data
        if data.get("api_token") is not None:
            raise ValueError("set CQRS_API_TOKEN or CQRS_API_TOKEN_FILE, not both")
        path = Path(data["api_token_file"])
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"CQRS_API_TOKEN_FILE: cannot read {path}: {e.strerror}") from e
        return {**data, "api_token": token}

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would make "Authorization: Bearer " a valid credential.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("the API token is empty")
        return token

    projector_partitions: int = Field(
        default=4, ge=1, le=256, description="P event queues for the projector replicas"
    )
    parked_max_messages: int = Field(
        default=100_000,
        ge=1,
        description="events `cqrs.projector.parked` holds; beyond, the broker refuses more and "
        "the projector keeps the event in its partition until there is room",
    )
    parked_max_bytes: int = Field(
        default=134_217_728,
        ge=1_048_576,
        description="body bytes `cqrs.projector.parked` holds (128 MiB), the same way; at "
        "least 1 MiB, the largest event body the projector reads, so any event can be parked",
    )
    parked_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="wait before an event the full parked queue refused is requeued and tried "
        "again",
    )
    run_projector: bool = Field(default=True, description="run the projector in this process")
    run_api: bool = Field(default=True, description="run the HTTP API in this process")
    api_processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="with the projector and the API both on: processes that serve the API, "
        "started and supervised by the projector's and sharing its port, so a read never waits "
        "behind projection work (`0`: the API in the projector's own event loop)",
    )
    projector_gap_attempts: int = Field(
        default=5,
        ge=1,
        le=1_000,
        description="retries of an event ahead of a missing one before it is parked",
    )
    projector_gap_delay_seconds: float = Field(
        default=0.2, ge=0, le=60, description="the wait between those retries"
    )
    projector_batch_size: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="events of one partition projected together at most (bounded by "
        "`CQRS_PREFETCH`): those ready when the previous batch is done, never waiting for more",
    )
    projector_rebalance_seconds: float = Field(
        default=5.0,
        ge=0,
        description="how often replicas even out the partitions (`0`: never)",
    )
    read_wait_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="longest wait of a read with `min_version` / `min_position`",
    )
    read_wait_max_waiters: int = Field(
        default=128,
        ge=0,
        description="reads waiting for `min_version` / `min_position` at once; more get 503 "
        "at once (`0`: a read whose version is not there yet is refused); below "
        "`CQRS_HTTP_MAX_CONCURRENCY`",
    )
    readyz_max_lag: int = Field(
        default=1_000,
        ge=0,
        description="events waiting in the partition queues above which `/readyz` fails",
    )
    rebuild_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="replayed events written per batch"
    )
    rebuild_max_rounds: int = Field(
        default=20,
        ge=1,
        le=1_000,
        description="replay rounds before a rebuild that cannot catch up gives up",
    )
    rebuild_start_timeout_seconds: float = Field(
        default=60.0, gt=0, description="wait for a replay to start"
    )
    rebuild_idle_timeout_seconds: float = Field(
        default=60.0, gt=0, description="wait for a replay's next message"
    )
    rebuild_retire_seconds: float = Field(
        default=10.0, ge=0, description="grace before the replaced generation is dropped"
    )

    @model_validator(mode="after")
    def _requests_outlast_read_waits(self) -> QueryServiceSettings:
        if self.http_request_timeout_seconds <= self.read_wait_seconds:
            raise ValueError(
                "CQRS_HTTP_REQUEST_TIMEOUT_SECONDS must exceed CQRS_READ_WAIT_SECONDS, or every "
                "read that waits for its version would be cut off"
            )
        if self.read_wait_max_waiters >= self.http_max_concurrency:
            raise ValueError(
                "CQRS_READ_WAIT_MAX_WAITERS must be below CQRS_HTTP_MAX_CONCURRENCY, or reads "
                "waiting for their version could take every request slot"
            )
        return self
