"""Schemas of the health endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadinessResponse(BaseModel):
    """Ready when the model is loaded, Redis answers and the live version the pointer names is
    served, or an earlier one while it swaps (503 otherwise, same body)."""

    status: Literal["ready", "not-ready"]
    model_loaded: bool
    redis: bool
    live_version: int | None
    served_version: int | None
