"""Policy revisions: an id for every accepted version of a sandbox's policy, and the recent ones to go back to.

A revision id is derived from content: `r` + the first 12 hex digits of SHA-256 over the canonical JSON of the
sandbox record and the template record it compiles over. So every gateway node (and every worker process)
names the same policy the same way without coordinating, writers outside the API (a hand edit of the policy
file, another service writing Redis) need not supply one, and a template change is a new revision of each
sandbox that uses it. The id covers the records only: presets and default limits come from the configuration.

`RevisionHistory` keeps, per sandbox, the last `HISTORY_SIZE` distinct revisions accepted, newest first, each
with the sandbox record, when and through which source (api, file, redis). A revision accepted again (a
restore, an edit undone by hand) moves to the front instead of appearing twice, so the second entry is always
"the previous policy". Pure data: the stores decide where it is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, get_args

from gateway.errors import GatewayError, NotFound
from gateway.schema import Note

#: Distinct revisions kept per sandbox.
HISTORY_SIZE: Final = 20
REVISION_PATTERN: Final = re.compile(r"^r[0-9a-f]{12}$")
#: Who wrote the record: the control API, a hand edit of the embedded store's file, a record in Redis; or the
#: configuration, when a reload changed the [invariants] ceilings that bound the sandbox.
RevisionSource = Literal["api", "file", "redis", "config"]
SOURCES: Final = get_args(RevisionSource)


def revision_id(
    sandbox: Mapping[str, Any], template: Mapping[str, Any] | None, ceilings: Mapping[str, str] | None = None
) -> str:
    """The content id of a sandbox record compiled over a template record (None: none) and within ceilings (their
    template names and revisions; gateway.invariants): the same records give the same id in any key order, on any
    node."""
    content: dict[str, Any] = {"sandbox": sandbox, "template": template}
    if ceilings:
        content["ceilings"] = dict(ceilings)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "r" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def check_revision(value: object, field: str = "revision") -> str:
    if not isinstance(value, str) or not REVISION_PATTERN.fullmatch(value):
        shown = repr(value)[:40]
        raise GatewayError("INVALID_REVISION", f"{shown} is not a revision id (r and 12 hex digits)", field)
    return value


@dataclass(frozen=True, slots=True)
class Revision:
    """One accepted version of a sandbox's policy."""

    revision: Annotated[str, Note(pattern=REVISION_PATTERN.pattern)]
    at: Annotated[float, Note(description="Unix time it was accepted (last, when accepted again).")]
    source: Annotated[
        str,
        Note(
            enum=list(SOURCES),
            description="Who wrote it: api, file (a hand edit), redis; config: a reload changed "
            "the [invariants] ceilings bounding it.",
        ),
    ]
    record: Annotated[dict[str, Any], Note(description="The sandbox record as accepted (a restore re-applies it).")]
    template: Annotated[
        str | None, Note(description="The template it compiled over; a restore applies the template in force now.")
    ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "at": self.at,
            "source": self.source,
            "template": self.template,
            "record": self.record,
        }

    @classmethod
    def from_dict(cls, data: object) -> Revision:
        """One entry as `to_dict` wrote it (the sidecar file); ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError("a revision is an object")
        revision, at, source, record = data.get("revision"), data.get("at"), data.get("source"), data.get("record")
        template = data.get("template")
        if not isinstance(revision, str) or not REVISION_PATTERN.fullmatch(revision):
            raise ValueError("bad revision id")
        if not isinstance(at, int | float) or isinstance(at, bool) or source not in SOURCES:
            raise ValueError("bad revision entry")
        if not isinstance(record, dict):
            raise ValueError("bad revision record")
        if template is not None and not isinstance(template, str):
            raise ValueError("bad template name")
        return cls(revision, float(at), str(source), record, template)


def find_revision(entries: Sequence[Revision], sandbox_id: str, revision: str | None) -> Revision:
    """The entry to restore among a sandbox's `entries` (newest first): `revision`, or (None) the one before the
    revision in force."""
    if revision is None:
        if len(entries) < 2:
            raise NotFound("REVISION_NOT_FOUND", f"sandbox {sandbox_id!r} has no previous revision", "revision")
        return entries[1]
    for entry in entries:
        if entry.revision == revision:
            return entry
    raise NotFound(
        "REVISION_NOT_FOUND",
        f"sandbox {sandbox_id!r} has no revision {revision} among its last {HISTORY_SIZE}",
        "revision",
    )


class RevisionHistory:
    """The last `size` distinct revisions of each sandbox, newest first."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self.size = size
        self._by_sandbox: dict[str, list[Revision]] = {}
        #: Bumped on every change, so a store saves the history only when it changed.
        self.version = 0
        #: Called with (sandbox id, the entry now in force) for every new revision, and (sandbox id, None) when
        #: a sandbox's history is dropped: a store that shares the history between nodes passes them on.
        self.listeners: list[Callable[[str, Revision | None], None]] = []

    def current(self, sandbox_id: str) -> Revision | None:
        entries = self._by_sandbox.get(sandbox_id)
        return entries[0] if entries else None

    def add(self, sandbox_id: str, entry: Revision) -> bool:
        """`entry` is in force now: first, a former entry of the same id dropped. False when it already was
        (a file reload or a Redis resync re-applying the same records is not a new revision)."""
        entries = self._by_sandbox.setdefault(sandbox_id, [])
        if entries and entries[0].revision == entry.revision:
            return False
        entries[:] = [entry, *(e for e in entries if e.revision != entry.revision)][: self.size]
        self.version += 1
        for listener in self.listeners:
            listener(sandbox_id, entry)
        return True

    def forget(self, sandbox_id: str) -> None:
        if self._by_sandbox.pop(sandbox_id, None) is not None:
            self.version += 1
            for listener in self.listeners:
                listener(sandbox_id, None)

    def entries(self, sandbox_id: str) -> list[Revision]:
        return list(self._by_sandbox.get(sandbox_id, ()))

    def find(self, sandbox_id: str, revision: str | None) -> Revision:
        return find_revision(self._by_sandbox.get(sandbox_id, []), sandbox_id, revision)

    def keep_only(self, sandbox_ids: Iterable[str]) -> None:
        """Drop the history of every sandbox not in `sandbox_ids` (removed while no gateway followed)."""
        keep = set(sandbox_ids)
        for sandbox_id in [sid for sid in self._by_sandbox if sid not in keep]:
            self.forget(sandbox_id)

    # ------------------------------------------------------------------ persisted form

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {sid: [e.to_dict() for e in entries] for sid, entries in sorted(self._by_sandbox.items()) if entries}

    def load(self, data: object) -> int:
        """Adopt what `to_dict` wrote; entries that cannot be read are skipped. Returns how many were skipped."""
        skipped = 0
        if not isinstance(data, dict):
            return 1
        for sandbox_id, raw_entries in data.items():
            if not isinstance(sandbox_id, str) or not isinstance(raw_entries, list):
                skipped += 1
                continue
            entries: list[Revision] = []
            for raw in raw_entries:
                try:
                    entry = Revision.from_dict(raw)
                except ValueError:
                    skipped += 1
                    continue
                if all(e.revision != entry.revision for e in entries):
                    entries.append(entry)
            if entries:
                self._by_sandbox[sandbox_id] = entries[: self.size]
        self.version += 1
        return skipped
