"""The head registry: versioned adapter weights with aliases, per tenant.

A head is a name (``cats``) with numbered versions (``cats@3``) and movable
aliases (``cats:prod``); ``latest`` is the implicit alias of the highest
version. Weights are safetensors (never pickle). The blob is written first and
the registry row committed last, so a version is visible only once its weights
are safely on disk; a failed commit removes the blob again, and a crash in
between leaves a file that :meth:`HeadRegistry.collect_orphans` removes later.

Version numbers are never reused: ``head_names.last_version`` is bumped in the
transaction that inserts the version and survives deletes, so ``name@3``
always means the same weights (identified by ``weights_sha256``) or nothing.

``imagenet@<backbone>`` names a backbone's own ImageNet classifier, which every
tenant may use in predictions; it lives in the backbone, not here, so the name
``imagenet`` is reserved and no tenant can shadow it.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import (
    Database,
    HeadAliasRow,
    HeadNameRow,
    HeadVersionRow,
    begin_immediate,
    rows_changed,
    utcnow,
)
from service.store.observations import drop_observations
from service.store.pages import check_page_size, decode_token, encode_token, malformed_token

NAME_PATTERN = r"[a-z][a-z0-9-]{0,62}"
_NAME = re.compile(NAME_PATTERN)  # always fullmatch: "$" would accept a trailing newline
_REF = re.compile(rf"(?P<name>{NAME_PATTERN})(?:@(?P<version>[0-9]+)|:(?P<alias>{NAME_PATTERN}))?")
LATEST = "latest"
IMAGENET_HEAD = "imagenet"  # reserved: imagenet@<backbone> is that backbone's own ImageNet classifier
_IMAGENET_REF = re.compile(rf"{IMAGENET_HEAD}@(?P<backbone>[a-z][a-z0-9_.-]{{0,62}})")
MAX_VERSION = 2**31 - 1  # the column is a 32-bit integer on every backend
HEADS_FOLDER = "heads"  # named-blob folder that holds every version's weights
_COMMIT_ATTEMPTS = 5  # concurrent first creators of a head race to insert its head_names row


class ServedVersion(BaseModel):
    """What serving and export need of one version: what :meth:`HeadRegistry.resolve` reads, and no more.

    Never the metrics (megabytes for a 1,000-class confusion matrix) nor other versions' rows.
    """

    tenant: str
    name: str
    version: int
    backbone: str
    split_point: int | None
    kind: str
    classes: list[str]
    config: dict[str, Any]
    dataset_id: str
    job_id: str | None
    param_bytes: int
    created_at: datetime
    blob_key: str = Field(exclude=True)  # storage detail: never sent to clients
    weights_sha256: str = Field(exclude=True)  # identity of the weights: what caches key on
    monitor_blob_key: str | None = Field(None, exclude=True)  # its monitoring reference's blob; None: it has none


class HeadVersionInfo(ServedVersion):
    """A version as clients see it. In a head or a list of heads, ``metrics`` is its summary (the top-level
    numbers); :meth:`HeadRegistry.describe` gives the whole (per class, confusion matrix, calibration)."""

    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    aliases: list[str]


# The columns resolve reads (ServedVersion's): never metrics, hyperparams or other versions.
_SERVED_COLUMNS = (
    HeadVersionRow.tenant,
    HeadVersionRow.name,
    HeadVersionRow.version,
    HeadVersionRow.backbone,
    HeadVersionRow.split_point,
    HeadVersionRow.kind,
    HeadVersionRow.classes,
    HeadVersionRow.config,
    HeadVersionRow.dataset_id,
    HeadVersionRow.job_id,
    HeadVersionRow.param_bytes,
    HeadVersionRow.created_at,
    HeadVersionRow.blob_key,
    HeadVersionRow.weights_sha256,
    HeadVersionRow.monitor_blob_key,
)


class HeadInfo(BaseModel):
    """A head with all its versions (each with its metrics' summary) and aliases."""

    name: str
    latest_version: int
    versions: list[HeadVersionInfo]
    aliases: dict[str, int]
    shadow_version: int | None = None


class HeadRegistry:
    def __init__(self, db: Database, blobs: BlobStore, quotas: Quotas) -> None:
        self.db = db
        self.blobs = blobs
        self.quotas = quotas

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
        guard: Callable[[Session], None] | None = None,
        monitoring: dict[str, torch.Tensor] | None = None,
    ) -> HeadVersionInfo:
        """Store the weights, then commit the row under the next never-used version number of ``name``.

        ``monitoring``: the version's monitoring reference (``MonitoringReference.to_tensors``), stored as a blob
        of its own because the weights load strictly.

        ``guard(session)`` runs inside the inserting transaction, before the
        insert (a job checks it still holds its lease there): if it raises,
        nothing is committed, the blob is removed and the exception propagates.
        """
        check_name("head name", name)
        if name == IMAGENET_HEAD:
            raise InvalidArgument(
                f"head name '{IMAGENET_HEAD}' is reserved for the backbones' own ImageNet classifiers "
                f"('{IMAGENET_HEAD}@<backbone>'); choose another name"
            )
        weights = _saveable(tensors)
        param_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        blob_key = f"{HEADS_FOLDER}/{uuid.uuid4().hex}.safetensors"
        data = safetensors.torch.save(weights)
        self.blobs.put_named(blob_key, data)
        weights_sha256 = hashlib.sha256(data).hexdigest()
        monitor_key = None
        if monitoring is not None:
            monitor_key = f"{HEADS_FOLDER}/{uuid.uuid4().hex}.monitor.safetensors"
            self.blobs.put_named(monitor_key, safetensors.torch.save(_saveable(monitoring)))

        def insert(session: Session) -> HeadVersionRow:
            # the counter first: on SQLite that takes the write lock before anything is read, so the
            # guard and the quota see the rows as they will be committed
            version = _next_version(session, tenant, name)
            if guard is not None:
                guard(session)
            if job_id is not None and (published := _job_version(session, job_id)) is not None:
                raise _AlreadyPublished(published)  # rolls back the counter: no number is skipped
            self.quotas.check_new_head_version(session, tenant, name, param_bytes)
            row = HeadVersionRow(
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
                metrics_summary=metrics_summary(metrics),
                dataset_id=dataset_id,
                job_id=job_id,
                blob_key=blob_key,
                weights_sha256=weights_sha256,
                param_bytes=param_bytes,
                created_at=utcnow(),
                monitor_blob_key=monitor_key,
            )
            session.add(row)
            return row

        try:
            row = self._commit_retrying(insert)
        except _AlreadyPublished as published:
            # an earlier run of this job published it (then stalled or died before finishing the job)
            self._delete_blobs([blob_key, monitor_key])
            return published.info
        except BaseException:
            self._delete_blobs([blob_key, monitor_key])
            raise
        return _version_info(row, aliases=[LATEST])

    def version_of_job(self, tenant: str, job_id: str) -> HeadVersionInfo | None:
        """The version job ``job_id`` published, if any (its metrics as a summary)."""
        with self.db.session() as session:
            row = _job_version_row(session, job_id)
            return _version_info(row, aliases=[], summary=True) if row is not None and row.tenant == tenant else None

    def _commit_retrying(self, insert: Callable[[Session], HeadVersionRow]) -> HeadVersionRow:
        """Commit ``insert``; retry when a concurrent first creator inserted the head_names row first."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.db.session() as session:
                    return insert(session)
            except IntegrityError:
                # a concurrent first creator inserted the head_names row, or (uq_head_versions_job_id) another
                # run of the same job published: the next attempt finds that version
                if attempt == _COMMIT_ATTEMPTS:
                    raise

    # -- housekeeping --------------------------------------------------------------

    def collect_orphans(self, grace_s: float) -> int:
        """Delete weight files no version refers to that are older than ``grace_s``; return how many.

        Such files are left by a crash between writing the blob and committing
        its row. The grace keeps the blob of a version being created right now.
        """
        folder = self.blobs.root / "named" / HEADS_FOLDER
        if not folder.is_dir():
            return 0
        cutoff = time.time() - grace_s
        candidates = [path for path in folder.iterdir() if path.is_file() and path.stat().st_mtime < cutoff]
        if not candidates:
            return 0
        with self.db.session() as session:
            referenced = set(session.scalars(select(HeadVersionRow.blob_key)))
            referenced |= set(session.scalars(select(HeadVersionRow.monitor_blob_key)))
        removed = 0
        for path in candidates:
            if f"{HEADS_FOLDER}/{path.name}" not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- read ----------------------------------------------------------------------

    def resolve(self, tenant: str, ref: str) -> ServedVersion:
        """Resolve ``name`` (latest), ``name@3`` or ``name:alias`` to one version: what serving and export need.

        Reads the alias (or the highest version number) and that one version's serving columns, never its
        metrics nor any other version's row: a head of many versions with large metrics costs what one small does.
        """
        with self.db.session() as session:
            name, number = self._number(session, tenant, ref)
            served = _served(session, tenant, name, number)
            if served is None:
                raise self._no_version(session, tenant, name, number)
        return served

    def resolve_served(self, tenant: str, ref: str) -> tuple[ServedVersion, ServedVersion | None]:
        """``ref``'s version and the head's shadow version (None: no shadow, or the shadow is the version served),
        read in one transaction: what a prediction scores."""
        with self.db.session() as session:
            name, number = self._number(session, tenant, ref)
            served = _served(session, tenant, name, number)
            if served is None:
                raise self._no_version(session, tenant, name, number)
            shadow_number = _shadow_version(session, tenant, name)
            shadow = None
            if shadow_number is not None and shadow_number != number:
                shadow = _served(session, tenant, name, shadow_number)
        return served, shadow

    def describe(self, tenant: str, ref: str) -> HeadVersionInfo:
        """One version with everything clients see of it: its full metrics and its aliases (``latest`` too, as in
        :meth:`get`)."""
        with self.db.session() as session:
            name, number = self._number(session, tenant, ref)
            row = _version_row(session, tenant, name, number)
            if row is None:
                raise self._no_version(session, tenant, name, number)
            aliases = [a for a, v in sorted(_aliases(session, tenant, name)) if v == number]
            latest = number == _latest_version(session, tenant, name)
            return _version_info(row, aliases=[*aliases, LATEST] if latest else aliases)

    def _number(self, session: Session, tenant: str, ref: str) -> tuple[str, int]:
        """The head name and version number ``ref`` means (one small query for an alias or ``latest``)."""
        if (backbone := imagenet_backbone(ref)) is not None:
            raise InvalidArgument(
                f"'{ref}' is backbone '{backbone}''s own ImageNet classifier: use it in predictions; it has no "
                "stored versions, aliases or export"
            )
        match = _REF.fullmatch(ref) if isinstance(ref, str) else None
        if not match:
            raise InvalidArgument(
                f"head reference {_shown(ref)} is malformed; use 'name', 'name@<version>' or 'name:<alias>' "
                "with a name of lowercase letters, digits and '-'"
            )
        name, version, alias = match["name"], match["version"], match["alias"]
        if version is not None:
            return name, _parse_version(version)
        where = (HeadVersionRow.tenant == tenant, HeadVersionRow.name == name)
        if alias is not None and alias != LATEST:
            number = session.scalar(
                select(HeadAliasRow.version).where(
                    HeadAliasRow.tenant == tenant, HeadAliasRow.name == name, HeadAliasRow.alias == alias
                )
            )
            if number is None:
                if session.scalar(select(HeadVersionRow.id).where(*where).limit(1)) is None:
                    raise _head_not_found(name)
                known = sorted([*(a for a, _ in _aliases(session, tenant, name)), LATEST])
                raise NotFound(f"head '{name}' has no alias '{alias}'; its aliases are {known}")
            return name, number
        latest = _latest_version(session, tenant, name)
        if latest is None:
            raise _head_not_found(name)
        return name, latest

    @staticmethod
    def _no_version(session: Session, tenant: str, name: str, number: int) -> NotFound:
        numbers = list(
            session.scalars(
                select(HeadVersionRow.version)
                .where(HeadVersionRow.tenant == tenant, HeadVersionRow.name == name)
                .order_by(HeadVersionRow.version)
            )
        )
        if not numbers:
            return _head_not_found(name)
        return NotFound(f"head '{name}' has no version {number}; its versions are {numbers}")

    def get(self, tenant: str, name: str) -> HeadInfo:
        """The head with every version and alias; versions carry their metrics' summary (:meth:`describe` has the
        whole): a head of hundreds of 1,000-class versions would otherwise read gigabytes of confusion matrices."""
        check_name("head name", name)
        with self.db.session() as session:
            heads = _load_heads(session, tenant, [name])
        if not heads:
            raise _head_not_found(name)
        return heads[0]

    def list(
        self, tenant: str, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[HeadInfo], str | None]:
        """Heads in name order; the token is the last name returned. Versions carry their metrics' summary."""
        check_page_size(page_size)
        query = select(HeadVersionRow.name).where(HeadVersionRow.tenant == tenant).distinct()
        if page_token:
            (last_name,) = decode_token(page_token, 1)
            if not _NAME.fullmatch(last_name):
                raise malformed_token(page_token)
            query = query.where(HeadVersionRow.name > last_name)
        with self.db.session() as session:
            names = list(session.scalars(query.order_by(HeadVersionRow.name).limit(page_size + 1)))
            heads = _load_heads(session, tenant, names[:page_size])
        next_token = encode_token(heads[-1].name) if len(names) > page_size else None
        return heads, next_token

    def load_tensors(self, info: ServedVersion) -> dict[str, torch.Tensor]:
        """The version's tensors, after checking the file is the one its row recorded."""
        data = self.head_blob_bytes(info)
        if hashlib.sha256(data).hexdigest() != info.weights_sha256:
            raise FailedPrecondition(
                f"the stored weights of head '{info.name}' version {info.version} are corrupt (their sha256 "
                "differs from the one recorded when they were saved); delete this version and train it again",
                head=info.name,
                version=info.version,
            )
        return safetensors.torch.load(data)

    def load_monitoring(self, info: ServedVersion) -> dict[str, torch.Tensor] | None:
        """The version's monitoring reference as stored (``monitor.*`` tensors); None when it has none."""
        if info.monitor_blob_key is None:
            return None
        return safetensors.torch.load(self.blobs.get_named(info.monitor_blob_key))

    def head_blob_bytes(self, info: ServedVersion) -> bytes:
        """The version's safetensors file, as stored (for export)."""
        return self.blobs.get_named(info.blob_key)

    # -- aliases -------------------------------------------------------------------

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at ``version``, moving it if it already points elsewhere."""
        check_name("head name", name)
        _check_alias(alias)
        check_version(version)
        with self.db.session() as session:
            # the version row stays locked until the alias is written, so a concurrent delete_version (which locks
            # it too) either runs first (then this is NotFound) or after (then it removes this alias as well)
            if _version_row(session, tenant, name, version, lock=True) is None:
                raise NotFound(f"head '{name}' has no version {version}; set the alias to an existing version")
            # an upsert: concurrent first setters of one alias both succeed, the last one wins
            dialect = session.get_bind().dialect.name
            insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
            session.execute(
                insert(HeadAliasRow)
                .values(tenant=tenant, name=name, alias=alias, version=version)
                .on_conflict_do_update(index_elements=["tenant", "name", "alias"], set_={"version": version})
            )

    def remove_alias(self, tenant: str, name: str, alias: str) -> None:
        check_name("head name", name)
        _check_alias(alias)
        with self.db.session() as session:
            row = _alias_row(session, tenant, name, alias)
            if row is None:
                raise NotFound(f"head '{name}' has no alias '{alias}'")
            session.delete(row)

    # -- shadow --------------------------------------------------------------------

    def set_shadow(self, tenant: str, name: str, version: int) -> None:
        """Make ``version`` the head's shadow: every prediction of the head also scores it (idempotent)."""
        check_name("head name", name)
        check_version(version)
        with self.db.session() as session:
            if _version_row(session, tenant, name, version, lock=True) is None:  # see set_alias
                raise self._no_version(session, tenant, name, version)
            session.execute(
                update(HeadNameRow)
                .where(HeadNameRow.tenant == tenant, HeadNameRow.name == name)
                .values(shadow_version=version)
            )

    def clear_shadow(self, tenant: str, name: str) -> None:
        """Stop scoring a shadow (the comparison figures are kept); NotFound for an unknown head."""
        check_name("head name", name)
        with self.db.session() as session:
            if _latest_version(session, tenant, name) is None:
                raise _head_not_found(name)
            session.execute(
                update(HeadNameRow)
                .where(HeadNameRow.tenant == tenant, HeadNameRow.name == name)
                .values(shadow_version=None)
            )

    # -- delete --------------------------------------------------------------------

    def delete_version(self, tenant: str, name: str, version: int) -> None:
        """Delete one version and the aliases pointing at it; then its weights. Its number is never reused."""
        check_name("head name", name)
        check_version(version)
        with self.db.session() as session:
            row = _version_row(session, tenant, name, version, lock=True)  # see set_alias
            if row is None:
                raise NotFound(f"head '{name}' has no version {version}; nothing was deleted")
            blob_keys = [row.blob_key, row.monitor_blob_key]
            session.execute(
                delete(HeadAliasRow).where(
                    HeadAliasRow.tenant == tenant, HeadAliasRow.name == name, HeadAliasRow.version == version
                )
            )
            session.delete(row)
            session.execute(
                update(HeadNameRow)
                .where(HeadNameRow.tenant == tenant, HeadNameRow.name == name, HeadNameRow.shadow_version == version)
                .values(shadow_version=None)
            )
            drop_observations(session, tenant, name, version)
        self._delete_blobs(blob_keys)

    def delete_head(self, tenant: str, name: str) -> None:
        """Delete every version and alias of ``name``; then the weights. Its version numbers are never reused."""
        check_name("head name", name)
        with self.db.session() as session:
            where = (HeadVersionRow.tenant == tenant, HeadVersionRow.name == name)
            begin_immediate(session)  # SQLite; PostgreSQL locks the rows (a concurrent set_alias waits, or NotFound)
            rows = session.execute(
                select(HeadVersionRow.blob_key, HeadVersionRow.monitor_blob_key).where(*where).with_for_update()
            ).all()
            if not rows:
                raise NotFound(f"head '{name}' not found; nothing was deleted", head=name)
            session.execute(delete(HeadAliasRow).where(HeadAliasRow.tenant == tenant, HeadAliasRow.name == name))
            session.execute(delete(HeadVersionRow).where(*where))
            session.execute(
                update(HeadNameRow)
                .where(HeadNameRow.tenant == tenant, HeadNameRow.name == name)
                .values(shadow_version=None)
            )
            drop_observations(session, tenant, name, None)
        self._delete_blobs([key for row in rows for key in row])

    def _delete_blobs(self, keys: Iterable[str | None]) -> None:
        for key in keys:
            if key is not None:
                self.blobs.delete_named(key)


class _AlreadyPublished(Exception):
    """Inside create_version: the job already has its version, so nothing is inserted."""

    def __init__(self, info: HeadVersionInfo) -> None:
        super().__init__(info.name, info.version)
        self.info = info


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous and unshared: safetensors refuses tensors that share storage."""
    return {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}


def _job_version_row(session: Session, job_id: str) -> HeadVersionRow | None:
    return session.scalar(select(HeadVersionRow).where(HeadVersionRow.job_id == job_id))


def _job_version(session: Session, job_id: str) -> HeadVersionInfo | None:
    row = _job_version_row(session, job_id)
    if row is None:
        return None
    aliases = [a for a, v in _aliases(session, row.tenant, row.name) if v == row.version]
    return _version_info(row, aliases=aliases, summary=True)


def imagenet_backbone(ref: str) -> str | None:
    """The backbone whose ImageNet classifier ``ref`` names (``imagenet@mobilenet_v2``), else None."""
    match = _IMAGENET_REF.fullmatch(ref) if isinstance(ref, str) else None
    return match["backbone"] if match else None


def check_name(what: str, value: str) -> None:
    """Names of heads, aliases and tenants share one rule (URL- and metric-label-safe, no NUL or newline)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{what} {_shown(value)} is invalid; use 1-63 lowercase letters, digits and '-', starting with a letter"
        )


def check_version(version: int) -> None:
    """Version numbers are 1..2^31-1: anything else is the client's mistake, never a database error."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version {_shown(version)} is out of range; versions are 1 to {MAX_VERSION}")


def _parse_version(digits: str) -> int:
    """A reference's ``@<digits>`` as a checked version number (length first: int() of a huge string is slow)."""
    if len(digits) > len(str(MAX_VERSION)):
        raise InvalidArgument(f"version {digits[:20]}... is out of range; versions are 1 to {MAX_VERSION}")
    number = int(digits)
    check_version(number)
    return number


def _shown(value: object) -> str:
    """A client's value for an error message: quoted, escaped (NUL, newline) and cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _next_version(session: Session, tenant: str, name: str) -> int:
    """Bump and return ``name``'s never-reused version counter, creating it on first use.

    The conditional UPDATE takes the row lock (PostgreSQL) or the write lock
    (SQLite), so concurrent creators get distinct numbers. A head created
    before the counter existed starts from its highest stored version.
    """
    where = (HeadNameRow.tenant == tenant, HeadNameRow.name == name)
    bumped = session.execute(update(HeadNameRow).where(*where).values(last_version=HeadNameRow.last_version + 1))
    if rows_changed(bumped) == 0:
        highest = _latest_version(session, tenant, name)
        session.add(HeadNameRow(tenant=tenant, name=name, last_version=(highest or 0) + 1))
        session.flush()  # a concurrent first creator makes this an IntegrityError: the caller retries
    return session.scalar(select(HeadNameRow.last_version).where(*where)) or 0


def _served(session: Session, tenant: str, name: str, number: int) -> ServedVersion | None:
    """One version's serving columns, or None."""
    row = session.execute(
        select(*_SERVED_COLUMNS).where(
            HeadVersionRow.tenant == tenant, HeadVersionRow.name == name, HeadVersionRow.version == number
        )
    ).one_or_none()
    return None if row is None else ServedVersion.model_validate(row._asdict())


def _shadow_version(session: Session, tenant: str, name: str) -> int | None:
    return session.scalar(
        select(HeadNameRow.shadow_version).where(HeadNameRow.tenant == tenant, HeadNameRow.name == name)
    )


def _latest_version(session: Session, tenant: str, name: str) -> int | None:
    """The highest stored version of ``name`` (what ``latest`` means), None when it has none."""
    return session.scalar(
        select(func.max(HeadVersionRow.version)).where(HeadVersionRow.tenant == tenant, HeadVersionRow.name == name)
    )


def _check_alias(alias: str) -> None:
    check_name("alias", alias)
    if alias == LATEST:
        raise InvalidArgument("alias 'latest' always means the newest version and cannot be set or removed")


def _version_row(
    session: Session, tenant: str, name: str, version: int, *, lock: bool = False
) -> HeadVersionRow | None:
    """The version's row; ``lock``: held against concurrent writers until the transaction ends.

    PostgreSQL locks the row (FOR UPDATE); SQLite takes the database's write lock before reading.
    """
    query = select(HeadVersionRow).where(
        HeadVersionRow.tenant == tenant, HeadVersionRow.name == name, HeadVersionRow.version == version
    )
    if lock:
        begin_immediate(session)
        query = query.with_for_update()
    return session.scalar(query)


def _alias_row(session: Session, tenant: str, name: str, alias: str) -> HeadAliasRow | None:
    return session.scalar(
        select(HeadAliasRow).where(
            HeadAliasRow.tenant == tenant, HeadAliasRow.name == name, HeadAliasRow.alias == alias
        )
    )


def _head_not_found(name: str) -> NotFound:
    return NotFound(f"head '{name}' not found; list your heads to see valid names", head=name)


def _aliases(session: Session, tenant: str, name: str) -> list[tuple[str, int]]:
    rows = session.execute(
        select(HeadAliasRow.alias, HeadAliasRow.version).where(HeadAliasRow.tenant == tenant, HeadAliasRow.name == name)
    )
    return [(alias, version) for alias, version in rows]


def metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What lists show of a version's metrics: its top-level finite numbers (accuracy, macro F1, ...)."""
    return {
        key: value
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def _load_heads(session: Session, tenant: str, names: list[str]) -> list[HeadInfo]:
    """HeadInfo for each of ``names`` that has versions, in name order, from two queries; versions carry their
    metrics' summary, never the deferred full metrics."""
    query = select(HeadVersionRow).where(HeadVersionRow.tenant == tenant, HeadVersionRow.name.in_(names))
    versions = session.scalars(query.order_by(HeadVersionRow.name, HeadVersionRow.version))
    rows_by_name: dict[str, list[HeadVersionRow]] = defaultdict(list)
    for row in versions:
        rows_by_name[row.name].append(row)
    aliases_by_name: dict[str, dict[str, int]] = defaultdict(dict)
    alias_rows = session.scalars(
        select(HeadAliasRow).where(HeadAliasRow.tenant == tenant, HeadAliasRow.name.in_(names))
    )
    for alias in alias_rows:
        aliases_by_name[alias.name][alias.alias] = alias.version
    shadow_rows = session.execute(
        select(HeadNameRow.name, HeadNameRow.shadow_version).where(
            HeadNameRow.tenant == tenant, HeadNameRow.name.in_(names)
        )
    )
    shadows = {name: version for name, version in shadow_rows}

    heads = []
    for name in sorted(rows_by_name):
        rows = rows_by_name[name]
        aliases = {**dict(sorted(aliases_by_name[name].items())), LATEST: rows[-1].version}
        heads.append(
            HeadInfo(
                name=name,
                latest_version=rows[-1].version,
                versions=[
                    _version_info(row, aliases=[a for a, v in aliases.items() if v == row.version], summary=True)
                    for row in rows
                ],
                aliases=aliases,
                shadow_version=shadows.get(name),
            )
        )
    return heads


def _version_info(row: HeadVersionRow, *, aliases: list[str], summary: bool = False) -> HeadVersionInfo:
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
        metrics=dict(row.metrics_summary if summary else row.metrics),
        dataset_id=row.dataset_id,
        job_id=row.job_id,
        param_bytes=row.param_bytes,
        created_at=row.created_at,
        aliases=aliases,
        blob_key=row.blob_key,
        weights_sha256=row.weights_sha256,
    )
