"""What a route gets from the app: the read-model catalog, the settings, query parameters that
refuse unknown names. Every route of every domain builds on these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict

from query_service.service_layer.catalog import ReadModelCatalog
from query_service.settings import QueryServiceSettings


class Params(BaseModel):
    """Query parameters: unknown ones are refused, so a typo never silently widens a query."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def get_catalog(request: Request) -> ReadModelCatalog:
    catalog: ReadModelCatalog = request.app.state.catalog
    return catalog


def get_settings(request: Request) -> QueryServiceSettings:
    settings: QueryServiceSettings = request.app.state.settings
    return settings


Catalog = Annotated[ReadModelCatalog, Depends(get_catalog)]

Settings = Annotated[QueryServiceSettings, Depends(get_settings)]
