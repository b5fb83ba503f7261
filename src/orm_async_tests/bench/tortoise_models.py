"""Tortoise ORM models of the SAME tables as :mod:`orm_async_tests.models`.

``Meta.table`` names the tables the Alembic migrations create, and every column
is mapped with the type the migrations gave it. Tortoise never creates or alters
anything here: the benchmark never calls ``generate_schemas``.

Defaults are Python-side (``default=``, ``auto_now_add``/``auto_now``), Tortoise's
usual way: the INSERT then sends every column and its statement text never
changes. The same server defaults declared as ``db_default`` make Tortoise build
an ``INSERT … DEFAULT`` statement per call, which ran ~25 % slower here. The
values match the server's (``'active'``, ``{}``, ``0``, ``{}``, a random UUID,
the current time — the client's clock instead of the transaction's). The enum
column is sent and read as text (Tortoise has no native PostgreSQL enum type);
``CharEnumField`` turns it into :class:`UserStatus`.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from tortoise import fields
from tortoise.contrib.postgres.fields import ArrayField
from tortoise.models import Model

APP = "bench"


class UserStatus(enum.StrEnum):
    active = "active"
    suspended = "suspended"


class User(Model):
    id = fields.BigIntField(primary_key=True)
    username = fields.CharField(max_length=64, unique=True)
    status = fields.CharEnumField(UserStatus, max_length=16, default=UserStatus.active)
    profile: fields.Field[dict[str, Any]] = fields.JSONField(default=dict)
    login_count = fields.IntField(default=0)
    public_id = fields.UUIDField(default=uuid.uuid4)
    tags = ArrayField("VARCHAR(32)", default=list)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    track_points: fields.ReverseRelation[TrackPoint]

    class Meta:
        table = "users"


class TrackPoint(Model):
    id = fields.BigIntField(primary_key=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        f"{APP}.User", related_name="track_points", source_field="user_id"
    )
    user_id: int
    lat = fields.FloatField()
    lon = fields.FloatField()
    date = fields.DatetimeField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "track_points"


class Group(Model):
    id = fields.BigIntField(primary_key=True)
    name = fields.CharField(max_length=64, unique=True)

    class Meta:
        table = "groups"
