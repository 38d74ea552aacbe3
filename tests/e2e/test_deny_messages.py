"""Operator messages and denial ids end to end: the real `gateway run --data-plane --steer` in the egress world
of tests/factory.py, driven through its API and CLI (in the gateway's namespace), with curl and dig in sb4.

sb4's record gets `egress.deny_messages` for its allowlist's miss and for one deny_hosts entry. A refused HTTP
request gets a 403 whose X-Gateway-Message header and body carry the operator's text and whose
X-Gateway-Denial-Id is the id of its flow record; a refused TLS connection (an alert, no text) and a refused DNS
question (NXDOMAIN, the text and id in the Extended DNS Error) get ids too; `GET /v1/denials/{id}` and
`gateway audit denial ID` find each record, also after a restart (from the audit batches). Hostile messages and
keys are refused with their codes.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.factory import NAMESPACE_API, EgressEnv, api, egress_env, pin, wait_until  # noqa: F401  (the fixture `env`)

SB = "sb4"
MISS = "Only allowed.test is reachable from here; ask #platform"
ENTRY = "denied.test is blocked by security review SEC-12"
MESSAGES = {"default:deny": MISS, "deny_hosts denied.test": ENTRY}


@pytest.fixture(scope="module")
def messaging(env: EgressEnv) -> EgressEnv:
    patch = {"egress": {"deny_hosts": ["denied.test"], "deny_messages": MESSAGES}}
    status, answer = api(env, "PATCH", f"/v1/sandboxes/{SB}", patch)
    assert status == 200 and answer["egress"]["deny_messages"] == MESSAGES, answer
    return env


def header(response: str, name: str) -> str:
    found = re.search(rf"^{name}: (.*?)\r?$", response, re.M)
    assert found, response
    return found.group(1)


def cli(env: EgressEnv, *args: str) -> str:
    argv = [sys.executable, "-m", "gateway.cli", "--api", NAMESPACE_API, *args]
    done = env.topo.run("gw", argv, check=False, timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.root
def test_a_denial_tells_the_operators_message_and_an_id_that_finds_its_record(messaging: EgressEnv) -> None:
    env = messaging
    ids: dict[str, str] = {}
    for name, address, text, rule in (
        ("later.test", "198.18.1.3", MISS, "default:deny"),
        ("denied.test", "198.18.1.2", ENTRY, "deny_hosts denied.test"),
    ):
        http = env.curl(SB, f"http://{name}/", "-i", *pin(name, 80, address))
        assert http.stdout.startswith("HTTP/1.1 403"), http.stdout
        assert header(http.stdout, "X-Gateway-Message") == text and header(http.stdout, "X-Gateway-Rule") == rule
        denial_id = header(http.stdout, "X-Gateway-Denial-Id")
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{10}", denial_id), denial_id
        assert text in http.stdout.split("\n\n", 1)[1] and denial_id in http.stdout.split("\n\n", 1)[1]
        status, record = api(env, "GET", f"/v1/denials/{denial_id}")
        assert status == 200, record
        assert (record["sandbox"], record["hostname"], record["protocol"], record["verdict"]) == (
            SB, name, "http", "deny"
        ), record  # fmt: skip
        assert (record["rule"], record["message"], record["denial_id"]) == (rule, text, denial_id), record
        ids[name] = denial_id

    # TLS: an alert carries no text, but the record has the message and an id of its own.
    tls = env.curl(SB, "https://later.test/", *pin("later.test", 443, "198.18.1.3"))
    assert tls.returncode != 0 and "alert access denied" in tls.stderr.lower(), tls.stderr
    [record] = env.logged_flows(SB, "later.test", "tls")
    assert record["message"] == MISS and record["denial_id"] not in ids.values(), record
    status, found = api(env, "GET", f"/v1/denials/{record['denial_id']}")
    assert status == 200 and {k: found[k] for k in ("start_us", "rule", "message")} == {
        k: record[k] for k in ("start_us", "rule", "message")
    }, found

    # DNS: NXDOMAIN, the reason, the message and the id in the Extended DNS Error.
    answer = env.dig(SB, "@198.18.1.2", "later.test", "A")
    assert "status: NXDOMAIN" in answer and MISS in answer, answer
    dns_id = re.search(r"\(denial ([0-9a-f]{8}-[0-9a-f]{10})\)", answer)
    assert dns_id, answer
    status, found = api(env, "GET", f"/v1/denials/{dns_id.group(1)}")
    assert status == 200 and (found["protocol"], found["message"]) == ("dns", MISS), found
    # What is allowed carries no id.
    allowed = env.curl(SB, "http://allowed.test/", "-i", *pin("allowed.test", 80, "198.18.1.1"))
    assert allowed.stdout.startswith("HTTP/1.1 200") and "X-Gateway-Denial-Id" not in allowed.stdout

    # The CLI shows the record, as `audit tail` shows a line.
    shown = cli(env, "audit", "denial", ids["denied.test"])
    assert "DENY" in shown and "denied.test" in shown and ENTRY in shown and ids["denied.test"] in shown, shown

    # Bad and unknown ids.
    status, error = api(env, "GET", "/v1/denials/not-an-id")
    assert (status, error["code"]) == (400, "INVALID_PARAMETER"), error
    status, error = api(env, "GET", "/v1/denials/00000001-0000000000")
    assert (status, error["code"]) == (404, "DENIAL_NOT_FOUND"), error

    # After a restart the ids are found in the audit batches.
    assert wait_until(lambda: any(ids["later.test"] in b.read_text() for b in (env.workdir / "audit").glob("*/*")))
    assert env.stop_gateway() == 0
    env.start_gateway()
    status, found = api(env, "GET", f"/v1/denials/{ids['later.test']}")
    assert status == 200 and (found["hostname"], found["message"]) == ("later.test", MISS), found


@pytest.mark.root
def test_hostile_messages_and_keys_are_refused_and_change_nothing(messaging: EgressEnv) -> None:
    env = messaging
    for messages, code, field in (
        ({"no-such-rule": "x"}, "INVALID_MESSAGE_RULE", "egress.deny_messages.no-such-rule"),
        ({"default:denyx": "x"}, "INVALID_MESSAGE_RULE", "egress.deny_messages.default:denyx"),
        ({"default:deny": "two\r\nX-Injected: 1"}, "INVALID_MESSAGE", "egress.deny_messages.default:deny"),
        ({"default:deny": "   "}, "INVALID_MESSAGE", "egress.deny_messages.default:deny"),
        ({"default:deny": "é"}, "INVALID_MESSAGE", "egress.deny_messages.default:deny"),
        ({"default:deny": "x" * 201}, "TOO_LONG", "egress.deny_messages.default:deny"),
        ({"default:deny": 7}, "INVALID_TYPE", "egress.deny_messages.default:deny"),
        ({f"deny_hosts {i}.test": "x" for i in range(51)}, "TOO_MANY_ENTRIES", "egress.deny_messages"),
    ):
        status, answer = api(env, "PATCH", f"/v1/sandboxes/{SB}", {"egress": {"deny_messages": messages}})
        assert (status, answer["code"], answer["field"]) == (400, code, field), (messages, answer)
    status, record = api(env, "GET", f"/v1/sandboxes/{SB}")
    assert status == 200 and record["egress"]["deny_messages"] == MESSAGES, record
