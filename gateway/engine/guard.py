"""What watches a relayed connection's client->server bytes after the decision: the relay's `Guard`s.

The client->server side of plain HTTP is always copied, because every later request head on the
connection is checked too (`HttpGuard`): a Host other than the one dialled is cut with a 403 once the
upstream has finished the earlier responses. Only a genuine WebSocket handshake ends the checking
(`gateway.peek.http1`: h2c and other upgrades are refused). A connection decided by address because its
client said nothing within the peek has its first words looked at still (`FirstWordsGuard`).

The HTTP meaning lives here; the relay (`gateway.engine.relay`) only moves bytes and asks the guard.
"""

from __future__ import annotations

from gateway.decision import CompiledPolicy, decide
from gateway.engine.relay import AfterAnswer, GuardStop
from gateway.peek.classify import CLASSIFY_MAX_BYTES, NEED_MORE, TrafficKind, classify
from gateway.peek.http1 import (
    Answer,
    AnswerAwaited,
    EndsBefore,
    HttpError,
    HttpEvent,
    HttpRequestTracker,
    RequestHead,
    ServerAnswer,
)
from gateway.rules import Rule

_AFTER = {Answer.SWITCH: AfterAnswer.SWITCH, Answer.RESUME: AfterAnswer.RESUME, Answer.CLOSE: AfterAnswer.CLOSE}


class HttpGuard:
    """Checks every later request head of a plain-HTTP connection against the host the upstream was dialled for."""

    __slots__ = ("host", "policy", "port", "tracker")

    def __init__(self, policy: CompiledPolicy, tracker: HttpRequestTracker, host: str | None, port: int) -> None:
        self.policy = policy
        self.tracker = tracker
        self.host = host
        self.port = port

    def check(self, events: list[HttpEvent], chunk_start: int) -> GuardStop | None:
        """Where the chunk that produced `events` must stop, or None when all of it may go."""
        for event in events:
            if isinstance(event, HttpError):
                return GuardStop(0, (f"{event.code}: {event.message}", Rule.HTTP))
            if isinstance(event, AnswerAwaited):  # the rest waits for the server's answer
                watch = ServerAnswer(event.awaiting, event.websocket_key)
                return GuardStop(max(0, event.offset - chunk_start), None, watch)
            if isinstance(event, EndsBefore):
                return GuardStop(max(0, event.offset - chunk_start), None)
            if isinstance(event, RequestHead) and event.host != self.host:
                cut = max(0, event.offset - chunk_start)
                # A later request for another host: decided on its own (name, port), once per such request.
                verdict = decide(self.policy, None if event.host_is_ip else event.host, None, self.port, "http")
                if not verdict.allowed:
                    return GuardStop(cut, (f"host {event.host}: {verdict.reason}", verdict.label))
                reason = f"request for host {event.host} on a connection opened for {self.host} (domain fronting)"
                return GuardStop(cut, (reason, Rule.HOST_MISMATCH))
        return None

    def feed(self, chunk: bytes) -> GuardStop | None:
        start = self.tracker.offset
        return self.check(self.tracker.feed(chunk), start)

    def answered(self, answer: object) -> AfterAnswer | tuple[str, str]:
        if isinstance(answer, HttpError):
            return (f"{answer.code}: {answer.message}", Rule.HTTP)
        assert isinstance(answer, Answer)
        self.tracker.answered(answer)
        return _AFTER[answer]


class FirstWordsGuard:
    """The client of a connection decided by address because it said nothing within the peek (a protocol where
    the server speaks first): its first bytes may be neither a TLS hello nor an HTTP request, which would name a
    host that decision never checked (an address learned from DNS for one name serves others too). Done once
    they are classified; until then they go (no request is complete before its first line is)."""

    __slots__ = ("buf", "waited")

    def __init__(self, waited: float) -> None:
        self.buf = bytearray()
        self.waited = waited

    def feed(self, chunk: bytes) -> GuardStop | None:
        self.buf += chunk[: CLASSIFY_MAX_BYTES - len(self.buf)]
        kind = classify(self.buf)
        if kind is NEED_MORE:
            return None
        if kind is TrafficKind.OPAQUE:
            return GuardStop(len(chunk), None, passthrough=True)
        reason = f"{kind} from a client that said nothing for {self.waited}s (decided by address, no name checked)"
        return GuardStop(0, (reason, Rule.PEEK))

    def answered(self, answer: object) -> AfterAnswer | tuple[str, str]:
        raise RuntimeError("no request of a server-speaks-first connection awaits an answer")
