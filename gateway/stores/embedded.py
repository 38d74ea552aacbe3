"""The embedded store: every policy in one local JSON file, reloaded when it changes.

The file is the source of truth, so an operator can edit it by hand or ship it with
configuration management. API writes rewrite it atomically (temp file, fsync, rename).
A hand edit that breaks the file (bad JSON) is rejected whole; a single invalid record
keeps its last good version. Either way the error is logged and shown in the status,
and the last good policy stays in force.

File format: `{"templates": {name: record}, "sandboxes": {id: record}}`.

The revision history (`gateway.revisions`) is kept next to it, in `<file>.revisions` (written atomically after
every change that adds to it, read at start), so that a restart keeps what can be restored. It is the
gateway's own file, not a policy: one that cannot be read is logged and started afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import structlog

from gateway.errors import Conflict, ErrorBody, NotFound
from gateway.files import FileWatch, read_regular_file, write_atomic
from gateway.state import SANDBOX, PolicyContext, Rejection
from gateway.stores.base import Expect, PolicyStore, StoreUnavailable
from gateway.stores.config import StoreConfig
from gateway.untrusted import InvalidJson, parse_json

log = structlog.get_logger("gateway.store.embedded")

FILE = "file"
SECTIONS = {"sandboxes": SANDBOX, "templates": "template"}


class PolicyFileError(ValueError):
    pass


def parse_policy_file(text: str | bytes) -> dict[str, dict[str, Any]]:
    """The file's two sections; raises PolicyFileError when the file as a whole is unusable (whatever it holds:
    bad JSON or UTF-8, duplicate keys, numbers too long to read, nesting too deep)."""
    try:
        data = parse_json(text) if text.strip() else {}
    except InvalidJson as exc:
        raise PolicyFileError(exc.message) from None
    if not isinstance(data, dict):
        raise PolicyFileError("the top level must be an object with 'templates' and 'sandboxes'")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise PolicyFileError(f"unknown top-level key(s) {', '.join(sorted(unknown))}; expected templates, sandboxes")
    sections: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise PolicyFileError(f"'{name}' must be an object keyed by {'id' if name == 'sandboxes' else 'name'}")
        sections[name] = section
    return sections


class EmbeddedStore(PolicyStore):
    backend = "embedded"

    def __init__(self, context: PolicyContext, config: StoreConfig, *, keeps_history: bool = True) -> None:
        super().__init__(context)
        self.path = config.path
        self.poll_interval = config.poll_interval
        self._sections: dict[str, dict[str, Any]] | None = None  # the file as last read, invalid records included
        #: Polled every poll_interval; it also absorbs our own writes, so that they are not read back.
        self._file = FileWatch([self.path])
        self._watcher: asyncio.Task[None] | None = None
        #: Where the revision history is kept; None in a worker's store (the main process's store keeps it: a
        #: worker reads the API's writes back from the file, so it would name their source wrongly).
        self.revisions_path = revisions_path(self.path) if keeps_history else None
        self._revisions_saved = 0  # the history's version last written (0: empty, no file needed)

    async def start(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write({"templates": {}, "sandboxes": {}})
            log.info("store.policy_file_created", path=str(self.path))
        self._load_revisions()
        self._file.changed()
        self._reload()
        # Sandboxes removed from the file while no gateway ran take their history with them.
        self.state.history.keep_only(self.state.sandboxes)
        self._save_revisions()
        self.ready.set()
        self._watcher = asyncio.create_task(self._watch(), name="policy-file-watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    def status(self) -> dict[str, Any]:
        return {**super().status(), "path": str(self.path)}

    # ------------------------------------------------------------------ reading

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if self._file.changed():
                async with self._write_lock:
                    self._reload()

    def _reload(self) -> None:
        """Read and apply the file; never raises, whatever it holds: a watcher that died would never apply a
        later edit (tightenings included), and start-up must not stop on a file it can report instead."""
        try:
            self._load_file()
        except Exception as exc:  # a fault of ours, not of the file's content: logged with the traceback
            log.exception("store.policy_file_load_failed", path=str(self.path))
            self._reject(f"could not be applied ({type(exc).__name__}: {exc})")
        self._save_revisions()

    def _load_file(self) -> None:
        try:
            sections = parse_policy_file(read_regular_file(self.path))
        except (OSError, PolicyFileError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._reject(reason)
            return
        self._sections = sections
        self.state.rejections.pop((FILE, str(self.path)), None)
        before = set(self.state.rejections)
        self.state.replace_all(sections["templates"], sections["sandboxes"])
        for key, rejection in self.state.rejections.items():
            if key not in before:
                log.error("store.policy_record_rejected", **rejection.to_dict())
        log.info(
            "store.policy_file_loaded",
            path=str(self.path),
            sandboxes=len(self.state.sandboxes),
            templates=len(self.state.templates),
            rejected=len(self.state.rejections),
        )

    def _reject(self, reason: str) -> None:
        """The file as a whole is unusable: the last good policies stay, API writes wait for a fix (so one
        cannot overwrite a half-finished edit), and the status says why until the file changes again (the
        watch took the file's signature before it was read)."""
        self._sections = None
        body = ErrorBody("POLICY_FILE_INVALID", f"{self.path}: {reason}; the last good policies stay in force")
        self.state.rejections[(FILE, str(self.path))] = Rejection(FILE, str(self.path), body, time.time())
        log.error("store.policy_file_rejected", path=str(self.path), code=body.code, message=body.message)

    # ------------------------------------------------------------------ writing

    async def _persist(self, kind: str, key: str, record: dict[str, Any] | None, expect: Expect) -> None:
        if self._sections is None:
            raise StoreUnavailable(
                "POLICY_FILE_INVALID",
                f"{self.path} cannot be parsed; fix or restore it before changing policies through the API",
            )
        section_name = "sandboxes" if kind == SANDBOX else "templates"
        section = dict(self._sections[section_name])
        present = key in section
        key_field = "id" if kind == SANDBOX else "name"
        if expect == "absent" and present:
            raise Conflict(f"{kind.upper()}_EXISTS", f"{kind} {key!r} already exists in {self.path}", key_field)
        if expect == "present" and not present:
            raise NotFound(f"{kind.upper()}_NOT_FOUND", f"no {kind} {key!r} in {self.path}", key_field)
        if record is None:
            section.pop(key, None)
        else:
            section[key] = record
        sections = {**self._sections, section_name: section}
        try:
            self._write(sections)
        except OSError as exc:
            raise StoreUnavailable("STORE_WRITE_FAILED", f"could not write {self.path}: {exc}") from exc
        self._sections = sections

    # ------------------------------------------------------------------ revision history

    def _load_revisions(self) -> None:
        history = self.state.history
        if self.revisions_path is None:
            return
        try:
            skipped = history.load(parse_json(read_regular_file(self.revisions_path)))
        except FileNotFoundError:
            return
        except (OSError, InvalidJson) as exc:
            log.error("store.revisions_unreadable", path=str(self.revisions_path), error=str(exc))
            return
        if skipped:
            log.warning("store.revisions_skipped", path=str(self.revisions_path), entries=skipped)
        self._revisions_saved = history.version

    async def _revisions_committed(self) -> None:
        self._save_revisions()

    def _save_revisions(self) -> None:
        history = self.state.history
        if self.revisions_path is None or history.version == self._revisions_saved:
            return
        try:
            write_atomic(self.revisions_path, json.dumps(history.to_dict(), sort_keys=True).encode() + b"\n")
        except OSError as exc:  # the policy write itself went through; only what can be restored after a restart lags
            log.error("store.revisions_write_failed", path=str(self.revisions_path), error=str(exc))
            return
        self._revisions_saved = history.version

    def _write(self, sections: dict[str, dict[str, Any]]) -> None:
        write_atomic(self.path, json.dumps(sections, indent=2, sort_keys=True).encode() + b"\n")
        self._file.changed()


def revisions_path(policy_path: Path) -> Path:
    """Where the embedded store keeps the revision history of the policies in `policy_path`."""
    return policy_path.with_name(policy_path.name + ".revisions")
