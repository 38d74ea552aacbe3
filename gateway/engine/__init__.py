"""The egress engine: a transparent proxy fed by nftables TPROXY, deciding every sandbox connection.

One module per step, in pipeline order: `listener` (transparent sockets, accept loop), `session` (the
peek: deadline, size bound, typed result), `plan` (decide on the name and addresses, check the
destinations), `dial` (SO_MARK, connect timeout), `guard` (what watches the relayed client bytes),
`deny` (alerts, 403, RST, drain), `relay` (bytes both ways: copy, then splice), `record` (the one
decision record), and `engine` (`EgressEngine`, which runs them). The protocol parsers are
`gateway.peek`'s; the decision is `gateway.decision.decide`.

The steps are shaped so that a native fast path can later take over accept -> peek -> dial -> relay
behind the same interfaces: the peek session is sans-I/O (bytes in, one typed result out), the plan is
a pure function of the policy and the name plus one resolve, and the relay only moves bytes.
"""
