"""The API's optional bearer token (`CQRS_API_TOKEN`), compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

UNAUTHORIZED = "missing or wrong bearer token"

bearer = HTTPBearer(
    auto_error=False, description="`CQRS_API_TOKEN`: `Authorization: Bearer <token>`"
)


def require_token(token: SecretStr) -> Callable[..., Awaitable[None]]:
    """A dependency that refuses a request without `Authorization: Bearer <token>` (401)."""
    expected = token.get_secret_value().encode()

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        # Constant time, so the answer's timing tells nothing about the token.
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                status_code=401, detail=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"}
            )

    return check
