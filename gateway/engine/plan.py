"""The plan for one connection once its name (if any) is known: allowed or not, and the address to dial.

A named connection is allowed by its name and then dialled to an address the gateway resolved itself:
the original destination only if it is among them, else a resolved one (SNI spoofing gets the real
host or nothing). Every address is checked against `Destinations` (private, link-local, metadata, own,
blocklist; DNS rebinding lands here). Unnamed connections are allowed only by an `allow_cidrs` rule or
by a DNS-learned address of this sandbox.

A verdict that allows only because the policy is in report mode (`Verdict.would_deny`) is planned like any
allowing one (the address checks still refuse what they refuse), and the plan says so.

`decide` runs once per (name, address, port) the plan needs: the verdict on the original destination
is reused when it is among the resolved addresses (the common case), and the address-only verdict
that lets `allow_cidrs` override a special-range refusal is asked only when there is such a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.decision import CompiledPolicy, Verdict, decide
from gateway.destinations import Destinations, Refusal
from gateway.learned import LearnedDestinations
from gateway.resolver import ResolveError, Resolver
from gateway.rules import Rule


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with a connection once its name (if any) is known."""

    allowed: bool
    reason: str
    rule: Rule
    detail: str = ""
    dial: str | None = None  # the address to dial (the port is always the original one)
    from_allow_cidrs: bool = False
    unresolvable: bool = False
    #: The name an allowed plan was decided on (None: by address): what a policy change decides it on again.
    name: str | None = None
    would_deny: bool = False  # allowed only because the policy is in report mode
    #: No name of its own: the one the sandbox's DNS answer gave its address for, which decided it.
    learned: str | None = None

    @property
    def label(self) -> str:
        return self.rule.label(self.detail)


def dial_refusal(policy: CompiledPolicy, destinations: Destinations, address: str, port: int) -> Refusal | None:
    """Why `address`, which the sandbox's verdict allows, may still not be dialled (None: it may): the address
    guards, which only an allow_cidrs rule of the policy overrides, and only for an overridable refusal."""
    refusal = destinations.check(address)
    if refusal is None or (refusal.overridable and decide(policy, None, address, port, "tcp").rule is Rule.ALLOW_CIDRS):
        return None
    return refusal


def _usable(policy: CompiledPolicy, destinations: Destinations, address: str, port: int) -> bool:
    """The original destination, already allowed by the name's verdict: may it be dialled?"""
    return dial_refusal(policy, destinations, address, port) is None


def _refused(verdict: Verdict) -> Plan:
    return Plan(False, verdict.reason, verdict.rule, verdict.detail)


def plan_unnamed(
    policy: CompiledPolicy,
    orig: str,
    port: int,
    protocol: str,
    destinations: Destinations,
    learned: LearnedDestinations | None,
) -> Plan:
    """A connection with no usable name (opaque TCP, TLS without SNI, HTTP with an IP Host): by address only."""
    name = learned.lookup(policy.sandbox_id, orig) if learned is not None else None
    verdict = decide(policy, name, orig, port, protocol)
    if not verdict.allowed:
        return Plan(False, verdict.reason, verdict.rule, verdict.detail, learned=name)
    from_cidrs = verdict.rule is Rule.ALLOW_CIDRS
    refusal = destinations.check(orig)
    if refusal is not None and not (refusal.overridable and from_cidrs):
        return Plan(False, refusal.reason, refusal.rule, learned=name)
    reason = verdict.reason if name is None else f"{verdict.reason} (address learned from DNS for {name})"
    return Plan(
        True, reason, verdict.rule, verdict.detail, orig, from_cidrs, would_deny=verdict.would_deny, learned=name
    )


async def plan_named(
    policy: CompiledPolicy,
    name: str,
    orig: str,
    port: int,
    protocol: str,
    destinations: Destinations,
    resolver: Resolver,
) -> Plan:
    """A connection that names its host: decide on the name, then dial only what the gateway resolved."""
    verdict = decide(policy, name, orig, port, protocol)
    if not verdict.allowed:
        return _refused(verdict)
    if verdict.rule is Rule.ALLOW_CIDRS:
        # The address itself is explicitly allowed (the name is not): the connection goes where the client
        # sent it, exactly as an opaque connection to that address would.
        refusal = destinations.check(orig)
        if refusal is not None and not refusal.overridable:
            return Plan(False, refusal.reason, refusal.rule)
        return Plan(True, verdict.reason, verdict.rule, verdict.detail, orig, True, name=name)
    try:
        resolved = await resolver.resolve(name)
    except ResolveError as exc:
        reason = f"cannot resolve {name}: {exc.code} ({exc.message})"
        return Plan(False, reason, Rule.RESOLVE_FAILED, unresolvable=True)
    addresses = resolved.addresses
    if orig in addresses and _usable(policy, destinations, orig, port):
        # The common case: the client dialled an address the name resolves to, and that address may be
        # reached: it is the one dialled whatever the others are, so they need no checks.
        return Plan(True, verdict.reason, verdict.rule, verdict.detail, orig, name=name, would_deny=verdict.would_deny)
    usable: list[str] = []
    first_refusal: str | None = None
    first_rule, first_detail = Rule.SPECIAL_ADDRESS, ""
    for address in addresses:
        # deny_cidrs apply to resolved addresses; the original destination's verdict is the one above.
        per_address = verdict if address == orig else decide(policy, name, address, port, protocol)
        if not per_address.allowed:
            if first_refusal is None:
                first_refusal = f"{name} resolves to {address}: {per_address.reason}"
                first_rule, first_detail = per_address.rule, per_address.detail
            continue
        refusal = destinations.check(address)
        if refusal is not None and not (
            refusal.overridable and decide(policy, None, address, port, "tcp").rule is Rule.ALLOW_CIDRS
        ):
            if first_refusal is None:
                first_refusal = f"{name} resolves to a refused address: {refusal.reason}"
                first_rule, first_detail = refusal.rule, ""
            continue
        usable.append(address)
    if not usable:
        return Plan(False, first_refusal or f"{name} has no usable address", first_rule, first_detail)
    if orig in usable:
        dial = orig
    else:
        same_family = [a for a in usable if (":" in a) == (":" in orig)]
        dial = (same_family or usable)[0]
    return Plan(True, verdict.reason, verdict.rule, verdict.detail, dial, name=name, would_deny=verdict.would_deny)


def replan(
    policy: CompiledPolicy,
    name: str | None,
    address: str,
    port: int,
    protocol: str,
    destinations: Destinations,
    learned: LearnedDestinations | None,
) -> Plan:
    """An established connection decided again once its sandbox's policy changed (the live cut): by the name
    its plan used at the address it was dialled to, or, unnamed, exactly as a new connection to it would be."""
    if name is None:
        return plan_unnamed(policy, address, port, protocol, destinations, learned)
    verdict = decide(policy, name, address, port, protocol)
    if not verdict.allowed:
        return _refused(verdict)
    if not _usable(policy, destinations, address, port):
        refusal = destinations.check(address)
        assert refusal is not None  # unusable means refused and not overridden
        return Plan(False, refusal.reason, refusal.rule)
    return Plan(True, verdict.reason, verdict.rule, verdict.detail, address, name=name, would_deny=verdict.would_deny)
