"""The README's record rules, through a running `gateway run`: every refused record class POSTed to the API
(status, code, field; nothing changes), the folding visible in the stored record, the conflicts, and the same
records written into the policy file (rejected, shown in /v1/status, the last good version kept)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.factory import LIMITED_TOKEN, Server, wait_until
from tests.product import ProductApi


@pytest.fixture(scope="module")
def api(product_server: Server) -> ProductApi:
    return ProductApi.checked(product_server.url)


def sandbox(sandbox_id: str = "v1", address: str = "10.75.3.1", **fields: Any) -> dict[str, Any]:
    return {"id": sandbox_id, "addresses": [address], **fields}


def allowlisted(**egress: Any) -> dict[str, Any]:
    return sandbox(profile="allowlisted", egress=egress)


def hosts(*names: str) -> dict[str, Any]:
    return allowlisted(allow_hosts=list(names))


def entry(**fields: Any) -> dict[str, Any]:
    return {"hosts": ["api.example.com"], **fields}


def inspect(*entries: dict[str, Any]) -> dict[str, Any]:
    return allowlisted(inspect=list(entries))


LONG_LABEL = "a" * 64
LONG_NAME = ".".join(["a" * 63] * 4) + ".com"  # 4*64 + 3 = 259 > 253

# (record, code, field); every one of them is a 400.
REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    ("id uppercase", sandbox("Agent"), "INVALID_ID", "id"),
    ("id starts with -", sandbox("-agent"), "INVALID_ID", "id"),
    ("id starts with _", sandbox("_agent"), "INVALID_ID", "id"),
    ("id with a dot", sandbox("a.b"), "INVALID_ID", "id"),
    ("id empty", sandbox(""), "INVALID_ID", "id"),
    ("id 64 chars", sandbox("a" * 64), "INVALID_ID", "id"),
    ("id not a string", sandbox(7), "INVALID_ID", "id"),  # type: ignore[arg-type]
    ("address outside subnets", sandbox(address="192.168.1.1"), "ADDRESS_OUTSIDE_SUBNETS", "addresses[0]"),
    ("v6 address outside subnets", sandbox(address="2001:db8::1"), "ADDRESS_OUTSIDE_SUBNETS", "addresses[0]"),
    ("address not an address", sandbox(address="10.75.3.300"), "INVALID_ADDRESS", "addresses[0]"),
    ("no addresses", {"id": "v1", "addresses": []}, "MISSING_FIELD", "addresses"),
    (
        "nine addresses",
        {"id": "v1", "addresses": [f"10.75.3.{n}" for n in range(1, 10)]},
        "TOO_MANY_ENTRIES",
        "addresses",
    ),
    ("unknown field", sandbox(colour="red"), "UNKNOWN_FIELD", "colour"),
    ("unknown profile", sandbox(profile="open"), "INVALID_PROFILE", "profile"),
    ("transit profile", sandbox(profile="transit"), "PROFILE_NOT_SUPPORTED", "profile"),
    ("hostname with scheme", hosts("https://api.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("hostname with path", hosts("api.example.com/v1"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("hostname with port 0", hosts("api.example.com:0"), "INVALID_PORT", "egress.allow_hosts[0]"),
    ("hostname with ':' and no port", hosts("api.example.com:"), "INVALID_PORT", "egress.allow_hosts[0]"),
    ("hostname with two ports", hosts("api.example.com:443:80"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("IPv6 literal with port", hosts("[2001:db8::7]:443"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("hostname with userinfo", hosts("user@api.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("hostname an IPv4 address", hosts("203.0.113.7"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("hostname an IPv6 address", hosts("2001:db8::7"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("bare *", hosts("*"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("*.tld", hosts("*.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("**", hosts("**.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("mid-label *", hosts("a*.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("mid-name *", hosts("api.*.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("empty label", hosts("api..example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("leading hyphen label", hosts("-api.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("trailing hyphen label", hosts("api-.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("underscore label", hosts("a_b.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("label over 63", hosts(f"{LONG_LABEL}.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("name over 253", hosts(LONG_NAME), "INVALID_HOSTNAME", "egress.allow_hosts[0]"),
    ("second entry bad", hosts("ok.example.com", "bad name.example.com"), "INVALID_HOSTNAME", "egress.allow_hosts[1]"),
    ("51 hosts", hosts(*[f"h{n}.example.com" for n in range(51)]), "TOO_MANY_ENTRIES", "egress.allow_hosts"),
    ("unknown preset", allowlisted(presets=["nope"]), "UNKNOWN_PRESET", "egress.presets[0]"),
    ("cidr with host bits", allowlisted(allow_cidrs=["203.0.113.7/24"]), "INVALID_CIDR", "egress.allow_cidrs[0]"),
    (
        "51 cidrs",
        allowlisted(allow_cidrs=[f"203.0.113.{n}/32" for n in range(51)]),
        "TOO_MANY_ENTRIES",
        "egress.allow_cidrs",
    ),
    (
        "deny metadata host",
        allowlisted(deny_cidrs=["169.254.169.254/32"]),
        "DENY_METADATA_RANGE",
        "egress.deny_cidrs[0]",
    ),
    ("deny covering metadata", allowlisted(deny_cidrs=["128.0.0.0/1"]), "DENY_METADATA_RANGE", "egress.deny_cidrs[0]"),
    (
        "allow a metadata endpoint",
        allowlisted(allow_cidrs=["203.0.113.0/24", "100.100.100.200/32"]),
        "ALLOW_METADATA_ENDPOINT",
        "egress.allow_cidrs[1]",
    ),
    (
        "allow link-local",
        allowlisted(allow_cidrs=["169.254.0.0/24"]),
        "ALLOW_METADATA_ENDPOINT",
        "egress.allow_cidrs[0]",
    ),
    ("allow_ports without cidrs", allowlisted(allow_ports=[443]), "ALLOW_PORTS_WITHOUT_CIDRS", "egress.allow_ports"),
    ("port 0", allowlisted(allow_cidrs=["203.0.113.0/24"], allow_ports=[0]), "INVALID_PORT", "egress.allow_ports[0]"),
    ("port 65536", allowlisted(host_ports=[65536]), "INVALID_PORT", "egress.host_ports[0]"),
    ("allow_all outside unrestricted", allowlisted(mode="allow_all"), "PROFILE_CONFLICT", "egress.mode"),
    ("unknown enforcement", allowlisted(enforcement="audit"), "INVALID_ENFORCEMENT", "egress.enforcement"),
    (
        "report mode in registry",
        sandbox(profile="registry", egress={"enforcement": "report"}),
        "PROFILE_CONFLICT",
        "egress.enforcement",
    ),
    (
        "allow_all with lists",
        sandbox(profile="unrestricted", egress={"mode": "allow_all", "allow_hosts": ["a.example.com"]}),
        "EGRESS_MODE_CONFLICT",
        "egress.allow_hosts",
    ),
    (
        "internet off with allow lists",
        allowlisted(allow_internet=False, allow_hosts=["a.example.com"]),
        "EGRESS_DISABLED_WITH_RULES",
        "egress.allow_hosts",
    ),
    (
        "isolated with hosts",
        sandbox(egress={"allow_hosts": ["a.example.com"]}),
        "PROFILE_CONFLICT",
        "egress.allow_hosts",
    ),
    (
        "registry with hosts",
        sandbox(profile="registry", egress={"allow_hosts": ["a.example.com"]}),
        "PROFILE_CONFLICT",
        "egress.allow_hosts",
    ),
    (
        "registry with cidrs",
        sandbox(profile="registry", egress={"allow_cidrs": ["203.0.113.0/24"]}),
        "PROFILE_CONFLICT",
        "egress.allow_cidrs",
    ),
    (
        "list shorthand over 50",
        sandbox(profile="allowlisted", egress=[f"h{n}.example.com" for n in range(51)]),
        "TOO_MANY_ENTRIES",
        "egress",
    ),
    ("bandwidth 0", sandbox(limits={"bandwidth_mbit": 0}), "OUT_OF_RANGE", "limits.bandwidth_mbit"),
    (
        "bandwidth 10001",
        sandbox(limits={"bandwidth_mbit": 10001, "burst_mbit": 10001}),
        "OUT_OF_RANGE",
        "limits.bandwidth_mbit",
    ),
    ("burst 10001", sandbox(limits={"burst_mbit": 10001}), "OUT_OF_RANGE", "limits.burst_mbit"),
    (
        "burst below sustained",
        sandbox(limits={"bandwidth_mbit": 200, "burst_mbit": 100}),
        "BURST_BELOW_SUSTAINED",
        "limits.burst_mbit",
    ),
    ("missing template", sandbox(template="nope"), "TEMPLATE_NOT_FOUND", "template"),
    (
        "link protocol sctp",
        sandbox(private_links=[{"source": "v2", "protocol": "sctp"}]),
        "INVALID_PROTOCOL",
        "private_links[0].protocol",
    ),
    ("51 labels", sandbox(labels={f"k{n}": "v" for n in range(51)}), "TOO_MANY_ENTRIES", "labels"),
    ("inspect without hosts", inspect({"methods": ["GET"]}), "MISSING_FIELD", "egress.inspect[0].hosts"),
    ("inspect lower-case method", inspect(entry(methods=["get"])), "INVALID_METHOD", "egress.inspect[0].methods[0]"),
    ("inspect TRACE", inspect(entry(methods=["TRACE"])), "INVALID_METHOD", "egress.inspect[0].methods[0]"),
    ("inspect relative path", inspect(entry(paths=["v1/*"])), "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
    ("inspect path mid *", inspect(entry(paths=["/a/*/b"])), "INVALID_PATH_PATTERN", "egress.inspect[0].paths[0]"),
    ("inspect path too long", inspect(entry(paths=["/" + "p" * 256])), "TOO_LONG", "egress.inspect[0].paths[0]"),
    (
        "inspect pseudo-header condition",
        inspect(entry(headers=[{"name": ":path", "equals": "/"}])),
        "INVALID_HEADER_NAME",
        "egress.inspect[0].headers[0].name",
    ),
    (
        "inspect header condition with two tests",
        inspect(entry(headers=[{"name": "accept", "equals": "a", "absent": True}])),
        "HEADER_MATCH_AMBIGUOUS",
        "egress.inspect[0].headers[0]",
    ),
    (
        "inspect header value with CR/LF",
        inspect(entry(headers=[{"name": "accept", "prefix": "a\r\nx: y"}])),
        "INVALID_HEADER_VALUE",
        "egress.inspect[0].headers[0].prefix",
    ),
    (
        "inspect deny reason with CR/LF",
        inspect(entry(deny_reason="no\r\nSet-Cookie: x=1")),
        "INVALID_DENY_REASON",
        "egress.inspect[0].deny_reason",
    ),
    (
        "credential on transfer-encoding",
        inspect(entry(credentials=[{"header": "Transfer-Encoding", "secret": "github"}])),
        "INVALID_CREDENTIAL_HEADER",
        "egress.inspect[0].credentials[0].header",
    ),
    (
        "credential template without {secret}",
        inspect(entry(credentials=[{"header": "authorization", "secret": "github", "template": "Bearer x"}])),
        "CREDENTIAL_TEMPLATE",
        "egress.inspect[0].credentials[0].template",
    ),
    (
        "credential with a secret value",
        inspect(entry(credentials=[{"header": "authorization", "value": "sk-live-0123456789"}])),
        "SECRET_VALUE_IN_POLICY",
        "egress.inspect[0].credentials[0].value",
    ),
    (
        "credential with an unconfigured secret",
        inspect(entry(credentials=[{"header": "authorization", "secret": "github"}])),
        "UNKNOWN_SECRET",
        "egress.inspect[0].credentials[0].secret",
    ),
    (
        "one host in two inspect entries",
        inspect(entry(), entry(methods=["GET"])),
        "INSPECT_HOST_DUPLICATE",
        "egress.inspect[1].hosts[0]",
    ),
    (
        "registry with inspect",
        sandbox(profile="registry", egress={"inspect": [entry()]}),
        "PROFILE_CONFLICT",
        "egress.inspect",
    ),
]


@pytest.mark.parametrize(("record", "code", "field"), [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_a_refused_record_is_400_with_its_code_and_field_and_changes_nothing(
    api: ProductApi, record: dict[str, Any], code: str, field: str
) -> None:
    before = api.call("GET", "/v1/sandboxes", expect=200).body
    answer = api.call("POST", "/v1/sandboxes", record, expect=400)
    assert (answer.code, answer.body["field"]) == (code, field), answer.body
    assert api.call("GET", "/v1/sandboxes", expect=200).body == before


def test_names_are_folded_and_the_shorthands_expanded_in_the_stored_record(api: ProductApi) -> None:
    record = {
        "id": "folded",
        "addresses": ["10.75.3.10"],
        "profile": "allowlisted",
        "egress": ["API.Example.COM.", "Bücher.Example", "*.CDN.example.org", "198.51.100.7", "203.0.113.0/24"],
        "private_links": ["peer", {"source": "db", "ports": [5353], "protocol": "udp"}],
    }
    created = api.call("POST", "/v1/sandboxes", record, expect=201).body
    stored = api.call("GET", "/v1/sandboxes/folded", expect=200).body
    assert stored == created
    assert stored["egress"]["allow_hosts"] == ["api.example.com", "xn--bcher-kva.example", "*.cdn.example.org"]
    assert stored["egress"]["allow_cidrs"] == ["198.51.100.7/32", "203.0.113.0/24"]
    links = stored["private_links"]
    assert links[0]["source"] == "peer" and links[0]["protocol"] == "tcp" and not links[0]["ports"], links
    assert links[1] == {**links[1], "source": "db", "ports": [5353], "protocol": "udp"}, links
    # The folded spelling is the record: asking with another spelling finds the same rule.
    verdict = api.call("GET", "/v1/sandboxes/folded/explain?host=api.example.com", expect=200).body
    assert verdict["allowed"], verdict
    api.call("DELETE", "/v1/sandboxes/folded", expect=204)


def test_conflicts_are_409_and_change_nothing(api: ProductApi) -> None:
    api.call("POST", "/v1/templates", {"name": "base", "egress": {"allow_hosts": ["a.example.com"]}}, expect=201)
    first = {"id": "c1", "addresses": ["10.75.3.20"], "profile": "allowlisted", "template": "base"}
    api.call("POST", "/v1/sandboxes", first, expect=201)
    kept = api.call("GET", "/v1/sandboxes/c1", expect=200).body
    again = api.call("POST", "/v1/sandboxes", {**first, "addresses": ["10.75.3.21"]}, expect=409)
    assert (again.code, again.body["field"]) == ("SANDBOX_EXISTS", "id")
    taken = api.call("POST", "/v1/sandboxes", {"id": "c2", "addresses": ["10.75.3.22", "10.75.3.20"]}, expect=409)
    assert (taken.code, taken.body["field"]) == ("ADDRESS_IN_USE", "addresses[1]")
    for method, body in (
        ("PUT", {**first, "profile": "registry", "template": None}),
        ("PATCH", {"profile": "isolated"}),
    ):
        changed = api.call(method, "/v1/sandboxes/c1", body, expect=409)
        assert (changed.code, changed.body["field"]) == ("PROFILE_IMMUTABLE", "profile"), changed.body
    in_use = api.call("DELETE", "/v1/templates/base", expect=409)
    assert in_use.code == "TEMPLATE_IN_USE"
    missing = api.call("PUT", "/v1/sandboxes/ghost", {"id": "ghost", "addresses": ["10.75.3.23"]}, expect=404)
    assert missing.code == "SANDBOX_NOT_FOUND"
    assert api.call("GET", "/v1/sandboxes/ghost", expect=404).code == "SANDBOX_NOT_FOUND"
    assert api.call("GET", "/v1/sandboxes/c1", expect=200).body == kept
    assert api.call("GET", "/v1/templates/base", expect=200).body["name"] == "base"
    assert [s["id"] for s in api.call("GET", "/v1/sandboxes", expect=200).body["sandboxes"]] == ["c1"]
    api.call("DELETE", "/v1/sandboxes/c1", expect=204)
    api.call("DELETE", "/v1/templates/base", expect=204)


def test_bodies_over_1_mib_are_413_and_other_media_types_415(api: ProductApi) -> None:
    huge = json.dumps(sandbox("big", labels={"pad": "x" * (1 << 20)})).encode()
    assert api.call("POST", "/v1/sandboxes", data=huge, expect=413).code == "BODY_TOO_LARGE"
    as_text = json.dumps(sandbox("text")).encode()
    answer = api.call("POST", "/v1/sandboxes", data=as_text, headers={"Content-Type": "text/plain"}, expect=415)
    assert answer.code == "UNSUPPORTED_MEDIA_TYPE"
    assert api.call("GET", "/v1/sandboxes/big", expect=404).code == "SANDBOX_NOT_FOUND"
    assert api.call("GET", "/v1/sandboxes/text", expect=404).code == "SANDBOX_NOT_FOUND"


def test_a_token_without_the_profile_scope_is_403_before_validation(api: ProductApi) -> None:
    limited = ProductApi(api.url, LIMITED_TOKEN)
    # invalid as well as out of scope: the scope answers first
    denied = limited.call("POST", "/v1/sandboxes", hosts("https://bad"), expect=403)
    assert denied.code == "NETWORK_PROFILE_DENIED"
    assert (
        limited.call("POST", "/v1/sandboxes", sandbox("scoped", "10.75.3.30"), expect=201).body["profile"] == "isolated"
    )
    assert limited.call("GET", "/v1/templates", expect=403).code == "INSUFFICIENT_SCOPE"
    limited.call("DELETE", "/v1/sandboxes/scoped", expect=204)


def wait_for_rejection(api: ProductApi, sandbox_id: str) -> dict[str, Any]:
    def rejection() -> dict[str, Any] | None:
        status = api.call("GET", "/v1/status", expect=200).body
        return next((r for r in status["rejected"] if (r["kind"], r["key"]) == ("sandbox", sandbox_id)), None)

    found = wait_until(rejection, 10)
    assert found is not None, api.call("GET", "/v1/status", expect=200).body
    return found


# The file's key names the record, so the id rows do not apply to it.
FILE_REFUSED = [row for row in REFUSED if row[3] != "id"]


def test_the_same_records_written_into_the_policy_file_are_rejected_and_the_last_good_version_stays(
    api: ProductApi, product_server: Server
) -> None:
    policies = Path(product_server.config.parent / "policies.json")
    good = {
        "id": "filed",
        "addresses": ["10.75.3.40"],
        "profile": "allowlisted",
        "egress": {"allow_hosts": ["a.example.com"]},
    }
    api.call("POST", "/v1/sandboxes", good, expect=201)
    stored = api.call("GET", "/v1/sandboxes/filed", expect=200).body
    for name, record, code, field in FILE_REFUSED:
        # An allowlisted record replaces the good one (its last good version must stay); any other profile
        # would be a profile change, so it arrives as a new record (which must not appear at all).
        key = "filed" if record.get("profile") == "allowlisted" else "new"
        data = json.loads(policies.read_text())
        data["sandboxes"][key] = {**record, "id": key}
        policies.write_text(json.dumps(data))
        rejected = wait_for_rejection(api, key)
        assert (rejected["code"], rejected["field"]) == (code, field), (name, rejected)
        assert api.call("GET", "/v1/sandboxes/filed", expect=200).body == stored, name
        assert api.call("GET", "/v1/sandboxes/filed/explain?host=a.example.com", expect=200).body["allowed"], name
        assert api.call("GET", "/v1/sandboxes/new", expect=404).code == "SANDBOX_NOT_FOUND", name
        data["sandboxes"].pop("new", None)
        # The record as stored: a GET's answer adds its read-only revision, which a record in the file never has.
        data["sandboxes"]["filed"] = {k: v for k, v in stored.items() if k != "revision"}
        policies.write_text(json.dumps(data))
        cleared = wait_until(lambda: not api.call("GET", "/v1/status", expect=200).body["rejected"], 10)
        assert cleared, (name, api.call("GET", "/v1/status", expect=200).body["rejected"])  # a valid version clears it
    api.call("DELETE", "/v1/sandboxes/filed", expect=204)
