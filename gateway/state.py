"""The policy state every component reads: records, compiled policies, address index.

Pure and synchronous. Both stores funnel every change through here, so the rules
that span records (profile is immutable, templates must exist, addresses are unique,
a template in use cannot go) hold the same for API writes, file edits and records
another service wrote to Redis. Records from outside that fail validation are not
applied: the last good version stays in force and the rejection is kept, visible
through the API, until a valid version arrives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from gateway.decision import CompiledPolicy, Verdict, address_key, compile_policy, decide
from gateway.errors import Conflict, ErrorBody, GatewayError, NotFound
from gateway.invariants import Invariants, exceeds, never_reach_guard, violations
from gateway.policy import IPNetwork, Limits, Sandbox, Template, parse_sandbox, parse_template
from gateway.presets import Preset
from gateway.revisions import Revision, RevisionHistory, RevisionSource
from gateway.rules import Rule
from gateway.schema import Note

SANDBOX = "sandbox"
TEMPLATE = "template"
#: Source addresses (as text) whose owner `policy_for_address` remembers; past that it starts over.
ADDRESS_MEMO_SIZE = 65536


class AddressInUse(Conflict):
    """ADDRESS_IN_USE: the address belongs to another sandbox, `owner` (which the API names only to a caller that
    may see it)."""

    def __init__(self, address: str, owner: str, field: str) -> None:
        super().__init__("ADDRESS_IN_USE", f"{address} belongs to sandbox {owner!r}", field)
        self.address = address
        self.owner = owner

    def hidden(self) -> Conflict:
        """The same refusal without the owner's id."""
        return Conflict("ADDRESS_IN_USE", f"{self.address} belongs to another sandbox", self.field)


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What validation and compilation need from the configuration."""

    subnets: tuple[IPNetwork, ...]
    presets: Mapping[str, Preset]
    default_limits: Limits
    #: The names of the secrets the [inspection] config holds (inspect entries' credentials may bind only these).
    secrets: frozenset[str] = frozenset()
    #: The operator's assertions and ceilings ([invariants], with the built-in gateway-services one).
    invariants: Invariants = field(default_factory=Invariants)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record written by someone other than this API (a file edit, another service) that failed validation;
    the last good version stays in force until a valid one arrives."""

    kind: str
    key: str
    error: ErrorBody  # flattened into the record's answer: its code, message and field, as in an error answer
    at: Annotated[float, Note(description="Unix time of the rejection.")]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "at": self.at, **self.error.to_dict()}


class PolicyState:
    def __init__(self, context: PolicyContext, external_source: RevisionSource = "file") -> None:
        self.context = context
        self.sandboxes: dict[str, Sandbox] = {}
        self.templates: dict[str, Template] = {}
        self.compiled: dict[str, CompiledPolicy] = {}
        self.by_address: dict[tuple[int, int], str] = {}
        self.rejections: dict[tuple[str, str], Rejection] = {}
        #: Sandboxes whose record in force breaks an [invariants] assertion or ceiling put in force after it was
        #: accepted (a reload): kept, held to the invariants at connection time, and reported, until a write that
        #: passes the checks replaces the record (or a later reload drops what it broke).
        self.violations: dict[str, Rejection] = {}
        # policy_for_address runs for every DNS query and connection, and parsing the address text is most of
        # its cost: the answer per text, forgotten whenever a sandbox (so the index or a policy) changes.
        self._by_text: dict[str, CompiledPolicy | None] = {}
        #: Called with the id of every sandbox removed, whoever removed it (what lived on it must not outlive it,
        #: even when a record under the same id comes back a moment later).
        self.removal_listeners: list[Callable[[str], None]] = []
        #: Called with the id of every sandbox whose policy changed or that was removed, whoever changed it, once
        #: the change is in force; each returns how many established flows it ended because of it (the live cut).
        self.change_listeners: list[Callable[[str], int]] = []
        #: The flows the last commit (a sandbox set or removed, a template set) ended: read by the writer that
        #: made it, right after its write returned.
        self.last_cut = 0
        #: The recent revisions of each sandbox (kept by the store where it keeps them).
        self.history = RevisionHistory()
        #: Who the commits in progress come from: "api" unless `apply_external` applies an outside record,
        #: which comes from `external_source` (the store's: a hand edit of its file, a record in Redis).
        self.source: RevisionSource = "api"
        self.external_source: RevisionSource = external_source
        self.removal_listeners.append(self.history.forget)

    # ------------------------------------------------------------------ parsing

    def parse_sandbox(self, raw: object, sandbox_id: str | None = None) -> Sandbox:
        return parse_sandbox(
            raw,
            subnets=self.context.subnets,
            known_presets=self.context.presets,
            known_secrets=self.context.secrets,
            sandbox_id=sandbox_id,
        )

    def parse_template(self, raw: object, name: str | None = None) -> Template:
        return parse_template(raw, known_presets=self.context.presets, known_secrets=self.context.secrets, name=name)

    # ------------------------------------------------------------------ reads

    def policy_for_address(self, address: str) -> CompiledPolicy | None:
        """The compiled policy of the sandbox that owns this source address; None fails closed."""
        if address in self._by_text:
            return self._by_text[address]
        try:
            sandbox_id = self.by_address.get(address_key(address))
        except ValueError:
            return None
        policy = self.compiled.get(sandbox_id) if sandbox_id else None
        if len(self._by_text) >= ADDRESS_MEMO_SIZE:
            self._by_text.clear()
        self._by_text[address] = policy
        return policy

    def get_sandbox(self, sandbox_id: str, visible: Callable[[str], bool] | None = None) -> Sandbox:
        """The record; NotFound when there is none, or when `visible` (the caller's scope) refuses the id: then
        the answer is the same as for a missing one."""
        found = self.sandboxes.get(sandbox_id)
        if found is None or (visible is not None and not visible(sandbox_id)):
            raise NotFound("SANDBOX_NOT_FOUND", f"no sandbox {sandbox_id!r}", "id")
        return found

    def get_template(self, name: str) -> Template:
        try:
            return self.templates[name]
        except KeyError:
            raise NotFound("TEMPLATE_NOT_FOUND", f"no template {name!r}", "name") from None

    def explain(
        self,
        sandbox_id: str,
        hostname: str | None,
        address: str | None,
        port: int | None,
        protocol: str,
        note: Callable[[Rule, str], None] | None = None,
    ) -> tuple[Verdict, CompiledPolicy]:
        policy = self.compiled.get(sandbox_id)
        if policy is None:
            raise NotFound("SANDBOX_NOT_FOUND", f"no sandbox {sandbox_id!r}", "id")
        return decide(policy, hostname, address, port, protocol, note), policy

    def candidate(self, sandbox_id: str, raw: object) -> CompiledPolicy:
        """A candidate record for an existing sandbox, parsed and checked exactly as a replace (PUT) would be (the
        same errors) and compiled over the template it names, as the replace would compile it. Nothing is
        applied."""
        sandbox = self.parse_sandbox(raw, sandbox_id=sandbox_id)
        self.check_sandbox(sandbox, create=False)
        return self._compile(sandbox)

    def _compile(self, sandbox: Sandbox, *, bounded: bool = True, over: Template | None = None) -> CompiledPolicy:
        """The sandbox's policy, with the invariants that apply to it (`bounded`), or without them: what its
        record alone grants, which the write checks compare with them. `over`: its template's candidate."""
        template = over or (self.templates.get(sandbox.template) if sandbox.template else None)
        context = self.context
        if not bounded:
            return compile_policy(sandbox, template, context.presets, context.default_limits)
        guard = never_reach_guard(context.invariants.assertions_for(sandbox.labels))
        ceilings = tuple((name, self._ceiling(sandbox, name)) for name in self.ceiling_names(sandbox))
        return compile_policy(sandbox, template, context.presets, context.default_limits, guard, ceilings)

    def ceiling_names(self, sandbox: Sandbox) -> tuple[str, ...]:
        """The templates `sandbox` stays within: the one it names if that is marked a ceiling, and those the
        [invariants] ceilings select by its labels."""
        named = self.templates.get(sandbox.template) if sandbox.template else None
        own = (named.name,) if named is not None and named.ceiling else ()
        return tuple(dict.fromkeys((*own, *self.context.invariants.ceiling_templates(sandbox.labels))))

    def _ceiling(self, sandbox: Sandbox, name: str) -> CompiledPolicy:
        """Template `name` compiled alone for `sandbox` (its profile, its id); a missing one refuses everything."""
        template = self.templates.get(name)
        if template is None:
            bare = Sandbox(sandbox.id, sandbox.addresses, profile="isolated")
            return compile_policy(bare, None, self.context.presets, self.context.default_limits)
        # The sandbox's profile where it is the narrower one; an unrestricted sandbox gets allow_all only from a
        # ceiling that says so (else the profile would lift every ceiling).
        profile = sandbox.profile
        if profile == "unrestricted" and template.egress.mode != "allow_all":
            profile = "allowlisted"
        bare = Sandbox(sandbox.id, sandbox.addresses, profile=profile, template=name)
        return compile_policy(bare, template, self.context.presets, self.context.default_limits)

    def dependents(self, template_name: str) -> list[str]:
        """The sandboxes whose policy a change of the template changes: those naming it and, when an [invariants]
        ceiling uses it, those that ceiling selects."""
        return sorted(
            sid
            for sid, sb in self.sandboxes.items()
            if sb.template == template_name or template_name in self.context.invariants.ceiling_templates(sb.labels)
        )

    # ------------------------------------------------------------------ checks (raise, change nothing)

    def check_sandbox(self, sandbox: Sandbox, *, create: bool | None) -> None:
        """`create`: True must be new, False must exist, None either (records from outside)."""
        current = self.sandboxes.get(sandbox.id)
        if create is True and current is not None:
            raise Conflict("SANDBOX_EXISTS", f"sandbox {sandbox.id!r} already exists", "id")
        if create is False and current is None:
            raise NotFound("SANDBOX_NOT_FOUND", f"no sandbox {sandbox.id!r}", "id")
        if current is not None and current.profile != sandbox.profile:
            raise Conflict(
                "PROFILE_IMMUTABLE",
                f"profile is set at creation and cannot change ({current.profile} -> {sandbox.profile}); "
                "create a new sandbox with the new profile",
                "profile",
            )
        if sandbox.template is not None and sandbox.template not in self.templates:
            raise GatewayError("TEMPLATE_NOT_FOUND", f"no template {sandbox.template!r}", "template")
        for index, addr in enumerate(sandbox.addresses):
            owner = self.by_address.get(address_key(addr))
            if owner is not None and owner != sandbox.id:
                raise AddressInUse(str(addr), owner, f"addresses[{index}]")
        self._check_invariants(sandbox)

    def _passes(self, sandbox: Sandbox) -> bool:
        try:
            self._check_invariants(sandbox)
        except GatewayError:
            return False
        return True

    def _check_invariants(self, sandbox: Sandbox, candidate: Template | None = None) -> None:
        """Raise the first invariant the sandbox's record breaks: INVARIANT_VIOLATED, CEILING_EXCEEDED (or
        CEILING_TEMPLATE_NOT_FOUND). With `candidate`, a template being written, the sandbox is checked over it."""
        over = candidate if candidate is not None and candidate.name == sandbox.template else None
        policy = self._compile(sandbox, bounded=False, over=over)
        for assertion in self.context.invariants.assertions_for(sandbox.labels):
            for where, message in violations(policy.effective_egress, assertion):
                raise self._violation("INVARIANT_VIOLATED", sandbox, where, message, candidate)
        for name in self.ceiling_names(sandbox):
            if candidate is not None and name == candidate.name:
                continue  # a ceiling's own change narrows (or widens) the ceiling: the sandbox stays within it
            if name not in self.templates:
                raise GatewayError(
                    "CEILING_TEMPLATE_NOT_FOUND",
                    f"the [invariants] ceiling of sandboxes with these labels is template {name!r}, which does not "
                    "exist: create it first",
                    "labels",
                )
            for where, message in exceeds(policy, self._ceiling(sandbox, name), name, sandbox.limits):
                raise self._violation("CEILING_EXCEEDED", sandbox, where, message, candidate)

    @staticmethod
    def _violation(code: str, sandbox: Sandbox, where: str, message: str, candidate: Template | None) -> GatewayError:
        """The error for a finding: at its field when the record being written sets it, else at the sandbox's
        template field, saying where the value comes from."""
        if candidate is not None:
            return GatewayError(code, f"sandbox {sandbox.id!r} would break it: {message}", where)
        section, _, rest = where.partition(".")
        record = sandbox.egress if section == "egress" else sandbox.limits
        if sandbox.template is None or getattr(record, rest.split("[")[0].split(".")[0], None) is not None:
            return GatewayError(code, message, where)
        return GatewayError(code, f"{message} (set by template {sandbox.template!r})", "template")

    def check_template(self, template: Template, *, create: bool | None) -> None:
        exists = template.name in self.templates
        if create is True and exists:
            raise Conflict("TEMPLATE_EXISTS", f"template {template.name!r} already exists", "name")
        if create is False and not exists:
            raise NotFound("TEMPLATE_NOT_FOUND", f"no template {template.name!r}", "name")
        for sandbox_id in self.dependents(template.name):
            self._check_invariants(self.sandboxes[sandbox_id], template)

    def check_remove_template(self, name: str) -> None:
        self.get_template(name)
        users = self.dependents(name)
        if users:
            shown = ", ".join(users[:10]) + (" ..." if len(users) > 10 else "")
            raise Conflict("TEMPLATE_IN_USE", f"template {name!r} is used by {len(users)} sandbox(es): {shown}", "name")

    # ------------------------------------------------------------------ commits (after checks passed)

    def set_sandbox(self, sandbox: Sandbox) -> None:
        compiled = self._compile(sandbox)
        self._unindex(sandbox.id)
        self.sandboxes[sandbox.id] = sandbox
        self.compiled[sandbox.id] = compiled
        self._by_text.clear()
        for addr in sandbox.addresses:
            self.by_address[address_key(addr)] = sandbox.id
        self.rejections.pop((SANDBOX, sandbox.id), None)
        self.violations.pop(sandbox.id, None)  # it passed the checks of the invariants in force
        self._note_revision(sandbox, compiled)
        self.last_cut = self._changed(sandbox.id)

    def set_context(self, context: PolicyContext) -> list[Rejection]:
        """Put a reloaded configuration's policy context in force: [invariants], the operator presets and the
        [limits] defaults. Every sandbox is compiled again under it at once, so `decide` refuses what it forbids
        from the next connection (a preset removed grants nothing, as a record naming a preset the config no
        longer has always did) and the live cut ends the open flows it no longer allows; every later write is
        checked against it. A record in force that breaks them stays (its
        connections are held to them anyway) and is returned, and kept in `violations`, as its rejection would be
        (when they made it invalid: it passed the ones before, or was reported already).
        A sandbox whose compiled policy changes is a new revision of it when its ceilings changed (source
        `config`)."""
        ids = sorted(self.sandboxes)
        # Reported: what a reload made invalid (a record that already exceeded a ceiling narrowed since, by a
        # template write, is not a reload's finding).
        reported = {sid for sid in ids if sid in self.violations or self._passes(self.sandboxes[sid])}
        self.context = context
        self.violations.clear()
        with self._writes_from("config"):
            for sandbox_id in ids:  # all in force before any listener reads one
                sandbox = self.sandboxes[sandbox_id]
                self.compiled[sandbox_id] = compiled = self._compile(sandbox)
                self._note_revision(sandbox, compiled)
                if sandbox_id not in reported:
                    continue
                try:
                    self._check_invariants(sandbox)
                except GatewayError as exc:
                    self.violations[sandbox_id] = Rejection(SANDBOX, sandbox_id, exc.body, time.time())
        self._by_text.clear()
        self.last_cut = sum(self._changed(sandbox_id) for sandbox_id in ids)
        return [self.violations[key] for key in sorted(self.violations)]

    def _note_revision(self, sandbox: Sandbox, compiled: CompiledPolicy) -> None:
        """The policy just put in force is the sandbox's newest revision (unless it already was)."""
        entry = Revision(compiled.revision, time.time(), self.source, sandbox.to_dict(), sandbox.template)
        self.history.add(sandbox.id, entry)

    @contextlib.contextmanager
    def _writes_from(self, source: RevisionSource) -> Iterator[None]:
        outer, self.source = self.source, source
        try:
            yield
        finally:
            self.source = outer

    def remove_sandbox(self, sandbox_id: str) -> Sandbox:
        sandbox = self.get_sandbox(sandbox_id)
        self._unindex(sandbox_id)
        del self.sandboxes[sandbox_id]
        del self.compiled[sandbox_id]
        self._by_text.clear()
        self.rejections.pop((SANDBOX, sandbox_id), None)
        self.violations.pop(sandbox_id, None)
        for listener in self.removal_listeners:
            listener(sandbox_id)
        self.last_cut = self._changed(sandbox_id)
        return sandbox

    def set_template(self, template: Template) -> None:
        self.templates[template.name] = template
        self.rejections.pop((TEMPLATE, template.name), None)
        cut = 0
        for sandbox_id in self.dependents(template.name):
            self.set_sandbox(self.sandboxes[sandbox_id])
            cut += self.last_cut
        self.last_cut = cut

    def _changed(self, sandbox_id: str) -> int:
        return sum(listener(sandbox_id) for listener in self.change_listeners)

    def remove_template(self, name: str) -> Template:
        self.check_remove_template(name)
        self.rejections.pop((TEMPLATE, name), None)
        return self.templates.pop(name)

    def _unindex(self, sandbox_id: str) -> None:
        old = self.sandboxes.get(sandbox_id)
        if old is not None:
            for addr in old.addresses:
                if self.by_address.get(address_key(addr)) == sandbox_id:
                    del self.by_address[address_key(addr)]

    # ------------------------------------------------------------------ records from outside

    def apply_external(self, kind: str, key: str, raw: object | None) -> Rejection | None:
        """Apply one record as another writer left it (`None`: deleted). Invalid: keep last good, record why."""
        with self._writes_from(self.external_source):
            return self._apply_external(kind, key, raw)

    def _apply_external(self, kind: str, key: str, raw: object | None) -> Rejection | None:
        try:
            if kind == SANDBOX:
                if raw is None:
                    if key in self.sandboxes:
                        self.remove_sandbox(key)
                    self.rejections.pop((SANDBOX, key), None)
                    return None
                sandbox = self.parse_sandbox(raw, sandbox_id=key)
                self.check_sandbox(sandbox, create=None)
                self.set_sandbox(sandbox)
            elif kind == TEMPLATE:
                if raw is None:
                    if key in self.templates:
                        self.remove_template(key)
                    self.rejections.pop((TEMPLATE, key), None)
                    return None
                template = self.parse_template(raw, name=key)
                self.check_template(template, create=None)
                self.set_template(template)
            else:
                raise GatewayError("UNKNOWN_KIND", f"unknown record kind {kind!r}", "kind")
        except GatewayError as exc:
            body = exc.body
        except (RecursionError, ValueError, TypeError, MemoryError) as exc:
            # A shape the parser did not foresee (nesting, sizes) is refused like any invalid record: the record's
            # last good version stays, and one hostile record cannot stop the others from being applied.
            body = ErrorBody("INVALID_RECORD", f"the record cannot be read ({type(exc).__name__})")
        else:
            return None
        rejection = Rejection(kind, key, body, time.time())
        self.rejections[(kind, key)] = rejection
        return rejection

    def replace_all(self, templates: Mapping[str, object], sandboxes: Mapping[str, object]) -> list[Rejection]:
        """Reconcile with a whole snapshot: add, change and remove so the state matches it.

        Invalid records keep their last good version. Order-independent: a record that
        failed only because of another record's old state (an address moving between
        sandboxes) is retried once the others are applied.
        """
        # A record that was only ever rejected has no state to remove, but its rejection must go with it.
        for sandbox_id in [sid for sid in self._known(SANDBOX, self.sandboxes) if sid not in sandboxes]:
            self.apply_external(SANDBOX, sandbox_id, None)
        for name, raw in sorted(templates.items()):
            self.apply_external(TEMPLATE, name, raw)
        pending = sorted(sandboxes.items())
        while pending:
            failed = [(sid, raw) for sid, raw in pending if self.apply_external(SANDBOX, sid, raw) is not None]
            if len(failed) == len(pending):
                break
            pending = failed
        for name in [n for n in self._known(TEMPLATE, self.templates) if n not in templates]:
            self.apply_external(TEMPLATE, name, None)
        return list(self.rejections.values())

    def _known(self, kind: str, applied: Mapping[str, object]) -> list[str]:
        """The keys of one kind this state holds: applied records and rejected ones."""
        return sorted({*applied, *(key for rejected_kind, key in self.rejections if rejected_kind == kind)})

    def records(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(templates, sandboxes) as plain data, the form the stores persist."""
        return (
            {name: t.to_dict() for name, t in self.templates.items()},
            {sid: s.to_dict() for sid, s in self.sandboxes.items()},
        )
