"""Request and response bodies (Pydantic v2)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from ..models import UserStatus

Username = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
]
# PostgreSQL text and jsonb refuse the NUL character: the schema says so up front
Text = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]
Key = Annotated[str, StringConstraints(max_length=64, pattern=r"^[^\x00]*$")]
Scalar = Text | int | float | bool | None
MAX_POINTS_PER_REQUEST = 10_000


class UserIn(BaseModel):
    username: Username
    profile: dict[Key, Scalar] = Field(
        default_factory=dict, max_length=50, description="A flat map of scalars (JSONB)"
    )
    tags: list[
        Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[^\x00]*$")]
    ] = Field(default_factory=list, max_length=20)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    status: UserStatus
    profile: dict[str, Any]
    tags: list[str]
    login_count: int
    created_at: AwareDatetime
    updated_at: AwareDatetime


class TrackPointIn(BaseModel):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    date: AwareDatetime


class TrackPointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    lat: float
    lon: float
    date: AwareDatetime


class Inserted(BaseModel):
    inserted: int


class TrackPointPage(BaseModel):
    items: list[TrackPointOut]
    next_after: int | None = Field(
        description="Pass as `after` to get the next page; null on the last page."
    )


class Stats(BaseModel):
    users: int
    track_points: int
    points_per_user: float
    first_point: AwareDatetime | None
    last_point: AwareDatetime | None


class Problem(BaseModel):
    """The body of every error response."""

    detail: str


class Health(BaseModel):
    database: str
    server_version: str
