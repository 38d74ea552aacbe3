"""What every policy store does: validate against the state, persist, then apply.

A write is checked completely before anything is persisted, and applied to the
in-memory state only after the backend confirmed it, so a failed write changes
nothing. Backends implement `_persist` (one record, with an optimistic condition)
and the loading/following of changes made by other writers.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from gateway.errors import Conflict, GatewayError
from gateway.policy import Sandbox, Template, schema_ref
from gateway.revisions import Revision, RevisionSource, find_revision
from gateway.schema import Note
from gateway.state import SANDBOX, TEMPLATE, PolicyContext, PolicyState, Rejection

#: What must hold in the backend for a write to go through: the key absent (create),
#: present (update, delete) or either.
Expect = Literal["absent", "present", "any"]


class StoreUnavailable(GatewayError):
    status = 503


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The policy store's state. Backends may add fields (the embedded store adds `path`)."""

    backend: Annotated[str, Note(enum=["embedded", "redis"])]
    ready: bool
    sandboxes: Annotated[int, Note(minimum=0)]
    templates: Annotated[int, Note(minimum=0)]
    rejected: Annotated[list[dict[str, Any]], Note(items=schema_ref("Rejection"))]  # each a Rejection.to_dict()
    violating: Annotated[
        list[dict[str, Any]],
        Note(
            items=schema_ref("Rejection"),
            description="Sandboxes whose record in force breaks an [invariants] assertion or ceiling a reload put "
            "in force after it was accepted: kept (their connections are held to the invariants), until a write "
            "that passes the checks replaces it.",
        ),
    ]


class PolicyStore(abc.ABC):
    backend: str = "?"
    #: The source the revision history names for records this store follows from other writers.
    external_source: RevisionSource = "file"

    def __init__(self, context: PolicyContext) -> None:
        self.state = PolicyState(context, self.external_source)
        self.ready = asyncio.Event()
        self._write_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the current records and begin following changes from other writers; sets `ready`."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def _persist(self, kind: str, key: str, record: dict[str, Any] | None, expect: Expect) -> None:
        """Durably write (or delete, `record=None`) one record; raise if `expect` does not hold."""

    def out_of_sync(self) -> str | None:
        """Why the loaded state may lag behind the store's source (None: it follows it), for readiness."""
        return None

    def sync_lag(self) -> float:
        """Seconds the loaded state may be behind the store's source, for metrics. 0 here: the embedded store's
        file is local (API writes go through it; a hand edit waits for the next poll, a configured delay)."""
        return 0.0

    def status(self) -> dict[str, Any]:
        return asdict(
            StoreStatus(
                backend=self.backend,
                ready=self.ready.is_set(),
                sandboxes=len(self.state.sandboxes),
                templates=len(self.state.templates),
                rejected=[r.to_dict() for r in self.rejections()],
                violating=[self.state.violations[key].to_dict() for key in sorted(self.state.violations)],
            )
        )

    def rejections(self) -> list[Rejection]:
        return sorted(self.state.rejections.values(), key=lambda r: (r.kind, r.key))

    async def revisions(self, sandbox_id: str) -> list[Revision]:
        """The sandbox's recent revisions, newest first (404 for an unknown sandbox)."""
        self.state.get_sandbox(sandbox_id)
        return self.state.history.entries(sandbox_id)

    @abc.abstractmethod
    async def _revisions_committed(self) -> None:
        """A commit may have added to the revision history (or dropped a sandbox's): the backend saves it where
        it keeps it."""

    # ------------------------------------------------------------------ writes

    async def apply_context(self, context: PolicyContext) -> list[Rejection]:
        """Put a reloaded policy context in force (`PolicyState.set_context`: invariants, presets, limits
        defaults), between writes: a write checked under the old one is committed first. Returns the sandboxes
        whose record in force breaks its invariants."""
        async with self._write_lock:
            violating = self.state.set_context(context)
            await self._revisions_committed()
            return violating

    async def create_sandbox(self, raw: object) -> Sandbox:
        async with self._write_lock:
            sandbox = self.state.parse_sandbox(raw)
            self.state.check_sandbox(sandbox, create=True)
            await self._persist(SANDBOX, sandbox.id, sandbox.to_dict(), "absent")
            self.state.set_sandbox(sandbox)
            await self._revisions_committed()
            return sandbox

    async def replace_sandbox(self, sandbox_id: str, raw: object, *, revision: str | None = None) -> Sandbox:
        """`revision`: the one the caller read (a record sent back with its `revision`); the write is refused
        when another revision is in force by now, so a read-modify-write cannot undo a change it never saw."""
        async with self._write_lock:
            return await self._replace_sandbox(sandbox_id, raw, revision)

    async def restore_sandbox(self, sandbox_id: str, revision: str | None) -> Revision:
        """Re-apply the record of one of the sandbox's recent revisions (None: the previous one) through the
        same checks as a replace. Returns the history entry restored."""
        async with self._write_lock:
            entry = find_revision(await self.revisions(sandbox_id), sandbox_id, revision)
            await self._replace_sandbox(sandbox_id, entry.record, None)
            return entry

    async def _replace_sandbox(self, sandbox_id: str, raw: object, revision: str | None) -> Sandbox:
        sandbox = self.state.parse_sandbox(raw, sandbox_id=sandbox_id)
        self.state.check_sandbox(sandbox, create=False)
        current = self.state.compiled[sandbox_id].revision
        if revision is not None and revision != current:
            raise Conflict(
                "REVISION_CONFLICT",
                f"the record sent was read at revision {revision}, but {current} is in force now; read it again",
                "revision",
            )
        await self._persist(SANDBOX, sandbox.id, sandbox.to_dict(), "present")
        self.state.set_sandbox(sandbox)
        await self._revisions_committed()
        return sandbox

    async def delete_sandbox(self, sandbox_id: str) -> Sandbox:
        async with self._write_lock:
            sandbox = self.state.get_sandbox(sandbox_id)
            await self._persist(SANDBOX, sandbox_id, None, "present")
            self.state.remove_sandbox(sandbox_id)
            await self._revisions_committed()
            return sandbox

    async def put_template(self, name: str, raw: object, *, create: bool | None) -> Template:
        async with self._write_lock:
            template = self.state.parse_template(raw, name=name)
            self.state.check_template(template, create=create)
            expect: Expect = "absent" if create is True else "present" if create is False else "any"
            await self._persist(TEMPLATE, name, template.to_dict(), expect)
            self.state.set_template(template)
            await self._revisions_committed()
            return template

    async def delete_template(self, name: str) -> Template:
        async with self._write_lock:
            self.state.check_remove_template(name)
            await self._persist(TEMPLATE, name, None, "present")
            return self.state.remove_template(name)
