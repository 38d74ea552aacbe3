"""The DNS exfiltration limits (gateway.dns.budget): label shape checks in the pure decision, and the per-sandbox
sliding window of distinct names and NXDOMAINs, on an injected clock."""

from __future__ import annotations

import random
import string

from dnslib import RCODE, DNSRecord

from gateway.dns.answer import ANSWER, FORWARD, decide_packet
from gateway.dns.budget import MAX_NAMES_UNBUDGETED, NameBudgets, label_alternations, label_limit
from gateway.dns.config import DnsConfig
from gateway.dns.wire import Code, parse_query
from gateway.rules import Rule
from tests.factory import Clock, ede_of, policy, query

CONFIG = DnsConfig()
WILD = policy("allowlisted", {"allow_hosts": ["*.wild.test", "api-v2.example.com", "*.cloudfront.net"]})
REPORT = policy("allowlisted", {"allow_hosts": ["one.test"], "enforcement": "report"})
#: Leftmost labels of ordinary names, as wildcards match them: none may be refused by the defaults.
ORDINARY = (
    "api-v2",
    "d1a2b3c4",
    "d3h4ks8f7s9k2l",  # a CloudFront distribution id: random on purpose, and short
    "storage-account-prod",
    "production-eu-west-1",
    "northamerica-northeast1",
    "login-microsoftonline",
    "prod-registry-k8s-io",
    "europe-west1-docker",
    "xn--mnchen-3ya",
    "objects-githubusercontent",
    "my-company-artifacts-bucket-2024",  # 4.1 bits per character: an entropy test would have refused it
    "prod-registry-k8s-io-us-east-1",
    "ip-172-31-20-15-us-west-2",
    "ec2-54-123-45-67-compute-1",
    "pr-12345-preview-frontend-app",
    "a",
)


def random_label(size: int, alphabet: str = string.ascii_lowercase + string.digits, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(size))


# --------------------------------------------------------------------------- label shape


def test_ordinary_labels_pass_the_default_shape_limits() -> None:
    for label in ORDINARY:
        assert label_limit([label], CONFIG.max_label_length, CONFIG.max_label_alternations) is None, label
        d = decide_packet(query(f"{label}.wild.test"), WILD, CONFIG)
        assert (d.action, d.budgeted) == (FORWARD, True), label


def test_a_long_label_under_a_wildcard_is_nxdomain_naming_the_limit() -> None:
    for size in (41, 63):
        d = decide_packet(query(f"{'a' * size}.wild.test", edns=True), WILD, CONFIG)
        assert (d.action, d.rcode, d.code, d.rule) == (
            ANSWER,
            RCODE.NXDOMAIN,
            Code.BLOCKED_LABEL_LENGTH,
            "builtin:dns_label",
        )
        reason = f"DNS_LABEL_LENGTH: label of {size} characters under a wildcard entry, over dns.max_label_length 40"
        assert d.reason == reason and ede_of(d.response) == (15, reason)
    assert decide_packet(query(f"{'a' * 40}.wild.test"), WILD, CONFIG).action == FORWARD  # at the limit
    # Off: the protocol's 63 is the only limit.
    assert decide_packet(query(f"{'a' * 63}.wild.test"), WILD, DnsConfig(max_label_length=0)).action == FORWARD


def test_alternations_count_switches_between_letters_and_digits() -> None:
    expected = {"a1b2": 3, "web-2024": 0, "0a0a": 3, "abc": 0, "": 0, "k8s": 2, "x-1-y": 0}
    assert {label: label_alternations(label) for label in expected} == expected


def test_encoded_data_under_a_wildcard_is_nxdomain_in_every_spelling() -> None:
    for alphabet in (string.hexdigits[:16], string.ascii_lowercase + "234567", string.ascii_lowercase + string.digits):
        label = random_label(32, alphabet, seed=3)  # hex, base32, base36: as DNS tunnels encode
        assert label_alternations(label) > CONFIG.max_label_alternations, label
        assert decide_packet(query(f"{label}.wild.test"), WILD, CONFIG).code == Code.BLOCKED_LABEL_RANDOM, label
    label = random_label(32, seed=3)
    for spelling in (f"{label}.wild.test", f"{label.upper()}.Wild.Test.", f"{label}.WILD.TEST"):
        d = decide_packet(query(spelling, edns=True), WILD, CONFIG)
        assert (d.rcode, d.code, d.rule) == (RCODE.NXDOMAIN, Code.BLOCKED_LABEL_RANDOM, Rule.DNS_LABEL), spelling
        alternations = label_alternations(label)
        assert d.reason == (
            f"DNS_LABEL_RANDOM: label under a wildcard entry looks random ({alternations} letter/digit alternations "
            "in 32 characters, over dns.max_label_alternations 8)"
        )
        assert ede_of(d.response) == (15, d.reason)
        answer = DNSRecord.parse(d.response)
        assert answer.auth and not answer.rr  # an SOA for negative caching, like every blocked name
    # Whatever the type asked: the name is refused, not answered empty.
    assert decide_packet(query(f"{label}.wild.test", "HTTPS"), WILD, CONFIG).code == Code.BLOCKED_LABEL_RANDOM
    assert decide_packet(query(f"{label}.wild.test"), WILD, DnsConfig(max_label_alternations=0)).action == FORWARD


def test_short_labels_are_never_judged_random() -> None:
    for size in (8, 12, 19):
        label = random_label(size, seed=size)
        assert label_limit([label], 40, 1) is None  # however low the threshold


def test_exact_entries_are_never_limited_only_wildcards_and_report_mode() -> None:
    long_random = random_label(50)
    exact = policy("allowlisted", {"allow_hosts": [f"{long_random}.example.com"]})
    d = decide_packet(query(f"{long_random}.example.com"), exact, CONFIG)
    assert (d.action, d.budgeted) == (FORWARD, False)
    assert decide_packet(query("api-v2.example.com"), WILD, CONFIG).budgeted is False
    # Unrestricted allows all egress: DNS is not the channel that matters there.
    d = decide_packet(query(f"{long_random}.example.com"), policy("unrestricted"), CONFIG)
    assert (d.action, d.budgeted) == (FORWARD, False)
    # Report mode lets any name through: every label is the client's, and the limits stay enforced.
    d = decide_packet(query(f"x.{long_random}.other.test"), REPORT, CONFIG)
    assert (d.code, d.rule, d.would_deny) == (Code.BLOCKED_LABEL_LENGTH, "builtin:dns_label", False)
    d = decide_packet(query("ordinary.other.test"), REPORT, CONFIG)
    assert (d.action, d.budgeted, d.would_deny) == (FORWARD, True, True)
    assert decide_packet(query("one.test"), REPORT, CONFIG).budgeted is False


def test_the_wildcard_label_only_is_judged_not_the_entrys_own() -> None:
    suffix = random_label(45)  # the operator's own entry: not the client's choice
    p = policy("allowlisted", {"allow_hosts": [f"*.{suffix}.example"]})
    assert decide_packet(query(f"www.{suffix}.example"), p, CONFIG).action == FORWARD


# --------------------------------------------------------------------------- the name budget


def budgets(names: int = 5, nxdomains: int = 3, window: float = 60.0, **kw: int) -> tuple[NameBudgets, Clock]:
    clock = Clock()
    return NameBudgets(names, nxdomains, window, clock=clock, **kw), clock


def name_of(spelling: str) -> str:
    """The name as the interceptor keys it: parsed from the packet (lowercased, no trailing dot)."""
    return parse_query(query(spelling)).name


def test_past_the_budget_new_names_are_refused_and_known_names_keep_resolving() -> None:
    b, clock = budgets(names=5, nxdomains=0)
    for i in range(5):
        assert b.admit("sb", f"n{i}.wild.test") is None
    refused = b.admit("sb", "n5.wild.test")
    assert refused is not None and refused.code == Code.REFUSED_NAME_BUDGET
    assert refused.reason == "DNS_NAME_BUDGET: sandbox queried more than 5 distinct names in 60 s"
    for i in range(5):  # the sandbox's own traffic survives
        assert b.admit("sb", f"n{i}.wild.test") is None
    assert b.admit("other", "n5.wild.test") is None  # per sandbox
    # The window slides: a name asked again keeps its place, the others age out.
    clock.now += 30
    assert b.admit("sb", "n0.wild.test") is None
    clock.now += 30.5
    assert b.admit("sb", "new1.wild.test") is None
    assert b.tracked("sb") == 2  # n0 (asked 30 s ago) and new1
    for i in range(3):
        assert b.admit("sb", f"again{i}.wild.test") is None
    assert b.admit("sb", "one-too-many.wild.test") is not None


def test_case_and_trailing_dot_variants_count_once() -> None:
    b, _ = budgets(names=2, nxdomains=0)
    for spelling in ("Api.Wild.Test", "api.wild.test.", "API.WILD.TEST", "api.wild.test"):
        assert b.admit("sb", name_of(spelling)) is None
    assert b.tracked("sb") == 1
    assert b.admit("sb", name_of("other.wild.test")) is None
    assert b.admit("sb", name_of("Third.Wild.Test.")) is not None


def test_nxdomain_heavy_sandbox_is_refused_new_names_after_the_nxdomain_budget() -> None:
    b, clock = budgets(names=100, nxdomains=3)
    for i in range(3):
        name = f"gone{i}.wild.test"
        assert b.admit("sb", name) is None
        b.nxdomain("sb", name)
        b.nxdomain("sb", name)  # the same name answered NXDOMAIN again (a retry): counted once
    assert b.admit("sb", "real.wild.test") is not None
    refused = b.admit("sb", "fresh.wild.test")
    assert refused is not None and refused.code == Code.REFUSED_NXDOMAIN_BUDGET
    assert refused.reason == "DNS_NXDOMAIN_BUDGET: sandbox got more than 3 NXDOMAIN answers in 60 s"
    assert b.admit("sb", "gone0.wild.test") is None  # asked before: still resolves (to its NXDOMAIN)
    b.nxdomain("sb", "never-admitted.wild.test")  # not in the window: nothing to count
    clock.now += 61
    assert b.admit("sb", "fresh.wild.test") is None


def test_a_flood_of_unique_names_keeps_memory_bounded() -> None:
    b, clock = budgets(names=50, nxdomains=10)
    admitted = 0
    rng = random.Random(0)
    for _ in range(100_000):
        name = f"{rng.getrandbits(120):030x}.wild.test"
        if b.admit("sb", name) is None:
            admitted += 1
            b.nxdomain("sb", name)
        clock.now += 0.001  # 100 s in all: the window moves on once
    assert b.tracked("sb") <= 50
    assert admitted <= 2 * 10  # what reached the upstream: the NXDOMAIN budget per window
    # Many sandboxes: at most `sandboxes` windows, the least recently active forgotten first.
    many, _ = budgets(names=50, nxdomains=10, sandboxes=100)
    for i in range(1000):
        many.admit(f"sb{i}", "a.wild.test")
    assert len(many) == 100 and many.tracked("sb999") == 1 and many.tracked("sb0") == 0
    # Only the NXDOMAIN budget on: the window is still bounded.
    nx_only, _ = budgets(names=0, nxdomains=10)
    for i in range(MAX_NAMES_UNBUDGETED + 500):
        assert nx_only.admit("sb", f"r{i}.wild.test") is None  # they resolve: only NXDOMAINs count
    assert nx_only.tracked("sb") == MAX_NAMES_UNBUDGETED


def test_both_budgets_off_track_nothing() -> None:
    b, _ = budgets(names=0, nxdomains=0)
    for i in range(1000):
        assert b.admit("sb", f"n{i}.wild.test") is None
    assert len(b) == 0


def test_new_budgets_from_a_reload_count_what_each_window_holds_already() -> None:
    b, _ = budgets(names=5, nxdomains=0)
    for i in range(3):
        assert b.admit("sb", f"n{i}.wild.test") is None
    b.reconfigure(3, 0, 30.0)  # lowered below what the window holds: no new name until it slides
    refused = b.admit("sb", "n3.wild.test")
    assert refused is not None
    assert refused.reason == "DNS_NAME_BUDGET: sandbox queried more than 3 distinct names in 30 s"
    assert b.admit("sb", "n0.wild.test") is None  # names already asked keep resolving
    b.reconfigure(0, 0, 30.0)  # off: nothing is tracked any more
    assert b.admit("sb", "n3.wild.test") is None and len(b) == 0
    b.reconfigure(1, 0, 30.0)  # on again: every window starts empty
    assert b.admit("sb", "n4.wild.test") is None
    assert b.admit("sb", "n5.wild.test") is not None
