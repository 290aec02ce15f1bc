"""The head registry: versioned adapter weights with aliases, per tenant.

A head is a name (``cats``) with numbered versions (``cats@3``) and movable
aliases (``cats:prod``); ``latest`` is the implicit alias of the highest
version. Weights are safetensors (never pickle). The blob is written first and
the registry row committed last, so a version is visible only once its weights
are safely on disk; a failed commit removes the blob again.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import InvalidArgument, NotFound
from service.store.blobs import BlobStore
from service.store.db import Database, HeadAliasRow, HeadVersionRow, utcnow
from service.store.pages import check_page_size, decode_token, encode_token

NAME_PATTERN = r"[a-z][a-z0-9-]{0,62}"
_NAME = re.compile(rf"^{NAME_PATTERN}$")
_REF = re.compile(rf"^(?P<name>{NAME_PATTERN})(?:@(?P<version>[0-9]{{1,9}})|:(?P<alias>{NAME_PATTERN}))?$")
LATEST = "latest"
_COMMIT_ATTEMPTS = 5  # concurrent creators of the same head race for the next version number


class HeadVersionInfo(BaseModel):
    tenant: str
    name: str
    version: int
    backbone: str
    split_point: int | None
    kind: str
    classes: list[str]
    config: dict[str, Any]
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    dataset_id: str
    job_id: str | None
    param_bytes: int
    created_at: datetime
    aliases: list[str]
    blob_key: str = Field(exclude=True)  # storage detail: never sent to clients


class HeadInfo(BaseModel):
    name: str
    latest_version: int
    versions: list[HeadVersionInfo]
    aliases: dict[str, int]


class HeadRegistry:
    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    # -- create ------------------------------------------------------------------

    def create_version(
        self,
        tenant: str,
        name: str,
        *,
        tensors: dict[str, torch.Tensor],
        backbone: str,
        split_point: int | None,
        kind: str,
        classes: list[str],
        config: dict[str, Any],
        hyperparams: dict[str, Any],
        metrics: dict[str, Any],
        dataset_id: str,
        job_id: str | None = None,
    ) -> HeadVersionInfo:
        """Store the weights, then commit the row as version max+1 of ``name``."""
        check_name("head name", name)
        # clone(): safetensors refuses tensors that share storage
        weights = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
        blob_key = f"heads/{uuid.uuid4().hex}.safetensors"
        data = safetensors.torch.save(weights)
        self.blobs.put_named(blob_key, data)
        weights_sha256 = hashlib.sha256(data).hexdigest()

        def make_row(version: int) -> HeadVersionRow:
            return HeadVersionRow(
                tenant=tenant,
                name=name,
                version=version,
                backbone=backbone,
                split_point=split_point,
                kind=kind,
                classes=list(classes),
                config=config,
                hyperparams=hyperparams,
                metrics=metrics,
                dataset_id=dataset_id,
                job_id=job_id,
                blob_key=blob_key,
                weights_sha256=weights_sha256,
                param_bytes=sum(t.numel() * t.element_size() for t in weights.values()),
                created_at=utcnow(),
            )

        try:
            row = self._insert_next_version(tenant, name, make_row)
        except BaseException:
            self.blobs.delete_named(blob_key)
            raise
        return _version_info(row, aliases=[LATEST])

    def _insert_next_version(
        self, tenant: str, name: str, make_row: Callable[[int], HeadVersionRow]
    ) -> HeadVersionRow:
        """Commit ``make_row(max + 1)``; retry when a concurrent writer took that number first."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.db.session() as session:
                    latest = session.scalar(
                        select(func.max(HeadVersionRow.version)).where(
                            HeadVersionRow.tenant == tenant, HeadVersionRow.name == name
                        )
                    )
                    row = make_row((latest or 0) + 1)
                    session.add(row)
                return row
            except IntegrityError:
                if attempt == _COMMIT_ATTEMPTS:
                    raise

    # -- read ----------------------------------------------------------------------

    def resolve(self, tenant: str, ref: str) -> HeadVersionInfo:
        """Resolve ``name`` (latest), ``name@3`` or ``name:alias`` to one version."""
        match = _REF.match(ref)
        if not match:
            raise InvalidArgument(
                f"head reference '{ref}' is malformed; use 'name', 'name@<version>' or 'name:<alias>' "
                "with a name of lowercase letters, digits and '-'"
            )
        name, version, alias = match["name"], match["version"], match["alias"]
        head = self.get(tenant, name)
        if version is not None:
            number = int(version)
        elif alias is not None:
            if alias not in head.aliases:
                raise NotFound(f"head '{name}' has no alias '{alias}'; its aliases are {sorted(head.aliases)}")
            number = head.aliases[alias]
        else:
            number = head.latest_version
        for info in head.versions:
            if info.version == number:
                return info
        raise NotFound(
            f"head '{name}' has no version {number}; its versions are {[v.version for v in head.versions]}"
        )

    def get(self, tenant: str, name: str) -> HeadInfo:
        with self.db.session() as session:
            heads = _load_heads(session, tenant, [name])
        if not heads:
            raise NotFound(f"head '{name}' not found; list your heads to see valid names", head=name)
        return heads[0]

    def list(
        self, tenant: str, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[HeadInfo], str | None]:
        """Heads in name order; the token is the last name returned."""
        check_page_size(page_size)
        query = select(HeadVersionRow.name).where(HeadVersionRow.tenant == tenant).distinct()
        if page_token:
            (last_name,) = decode_token(page_token, 1)
            query = query.where(HeadVersionRow.name > last_name)
        with self.db.session() as session:
            names = list(session.scalars(query.order_by(HeadVersionRow.name).limit(page_size + 1)))
            heads = _load_heads(session, tenant, names[:page_size])
        next_token = encode_token(heads[-1].name) if len(names) > page_size else None
        return heads, next_token

    def load_tensors(self, info: HeadVersionInfo) -> dict[str, torch.Tensor]:
        return safetensors.torch.load(self.head_blob_bytes(info))

    def head_blob_bytes(self, info: HeadVersionInfo) -> bytes:
        """The version's safetensors file, as stored (for export)."""
        return self.blobs.get_named(info.blob_key)

    # -- aliases -------------------------------------------------------------------

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at ``version``, moving it if it already points elsewhere."""
        _check_alias(alias)
        with self.db.session() as session:
            if _version_row(session, tenant, name, version) is None:
                raise NotFound(f"head '{name}' has no version {version}; set the alias to an existing version")
            row = _alias_row(session, tenant, name, alias)
            if row is None:
                session.add(HeadAliasRow(tenant=tenant, name=name, alias=alias, version=version))
            else:
                row.version = version

    def remove_alias(self, tenant: str, name: str, alias: str) -> None:
        _check_alias(alias)
        with self.db.session() as session:
            row = _alias_row(session, tenant, name, alias)
            if row is None:
                raise NotFound(f"head '{name}' has no alias '{alias}'")
            session.delete(row)

    # -- delete --------------------------------------------------------------------

    def delete_version(self, tenant: str, name: str, version: int) -> None:
        """Delete one version and the aliases pointing at it; then its weights."""
        with self.db.session() as session:
            row = _version_row(session, tenant, name, version)
            if row is None:
                raise NotFound(f"head '{name}' has no version {version}; nothing was deleted")
            blob_key = row.blob_key
            session.execute(
                delete(HeadAliasRow).where(
                    HeadAliasRow.tenant == tenant, HeadAliasRow.name == name, HeadAliasRow.version == version
                )
            )
            session.delete(row)
        self.blobs.delete_named(blob_key)

    def delete_head(self, tenant: str, name: str) -> None:
        """Delete every version and alias of ``name``; then the weights."""
        with self.db.session() as session:
            where = (HeadVersionRow.tenant == tenant, HeadVersionRow.name == name)
            blob_keys = list(session.scalars(select(HeadVersionRow.blob_key).where(*where)))
            if not blob_keys:
                raise NotFound(f"head '{name}' not found; nothing was deleted", head=name)
            session.execute(delete(HeadAliasRow).where(HeadAliasRow.tenant == tenant, HeadAliasRow.name == name))
            session.execute(delete(HeadVersionRow).where(*where))
        for key in blob_keys:
            self.blobs.delete_named(key)


def check_name(what: str, value: str) -> None:
    """Names of heads, aliases and tenants share one rule (URL- and metric-label-safe)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidArgument(
            f"{what} {value!r} is invalid; use 1-63 lowercase letters, digits and '-', starting with a letter"
        )


def _check_alias(alias: str) -> None:
    check_name("alias", alias)
    if alias == LATEST:
        raise InvalidArgument("alias 'latest' always means the newest version and cannot be set or removed")


def _version_row(session: Session, tenant: str, name: str, version: int) -> HeadVersionRow | None:
    return session.scalar(
        select(HeadVersionRow).where(
            HeadVersionRow.tenant == tenant, HeadVersionRow.name == name, HeadVersionRow.version == version
        )
    )


def _alias_row(session: Session, tenant: str, name: str, alias: str) -> HeadAliasRow | None:
    return session.scalar(
        select(HeadAliasRow).where(
            HeadAliasRow.tenant == tenant, HeadAliasRow.name == name, HeadAliasRow.alias == alias
        )
    )


def _load_heads(session: Session, tenant: str, names: list[str]) -> list[HeadInfo]:
    """HeadInfo for each of ``names`` that has versions, in name order, from two queries."""
    versions = session.scalars(
        select(HeadVersionRow)
        .where(HeadVersionRow.tenant == tenant, HeadVersionRow.name.in_(names))
        .order_by(HeadVersionRow.name, HeadVersionRow.version)
    )
    rows_by_name: dict[str, list[HeadVersionRow]] = defaultdict(list)
    for row in versions:
        rows_by_name[row.name].append(row)
    aliases_by_name: dict[str, dict[str, int]] = defaultdict(dict)
    alias_rows = session.scalars(
        select(HeadAliasRow).where(HeadAliasRow.tenant == tenant, HeadAliasRow.name.in_(names))
    )
    for alias in alias_rows:
        aliases_by_name[alias.name][alias.alias] = alias.version

    heads = []
    for name in sorted(rows_by_name):
        rows = rows_by_name[name]
        aliases = {**dict(sorted(aliases_by_name[name].items())), LATEST: rows[-1].version}
        heads.append(
            HeadInfo(
                name=name,
                latest_version=rows[-1].version,
                versions=[
                    _version_info(row, aliases=[a for a, v in aliases.items() if v == row.version]) for row in rows
                ],
                aliases=aliases,
            )
        )
    return heads


def _version_info(row: HeadVersionRow, *, aliases: list[str]) -> HeadVersionInfo:
    return HeadVersionInfo(
        tenant=row.tenant,
        name=row.name,
        version=row.version,
        backbone=row.backbone,
        split_point=row.split_point,
        kind=row.kind,
        classes=list(row.classes),
        config=dict(row.config),
        hyperparams=dict(row.hyperparams),
        metrics=dict(row.metrics),
        dataset_id=row.dataset_id,
        job_id=row.job_id,
        param_bytes=row.param_bytes,
        created_at=row.created_at,
        aliases=aliases,
        blob_key=row.blob_key,
    )
