"""The DNS exfiltration limits: what a sandbox may send upstream under names no policy entry spells out.

A wildcard allow entry (`*.example.com`) lets a sandbox make up the label beneath it, and every name it makes up
reaches the upstream resolvers and, through them, whoever serves that zone: a channel out of the sandbox, one
label at a time. An exact entry names a finite set of names and carries nothing. So these limits apply to names
a *wildcard* entry allowed (and, in report mode, to names only report mode let through); exact entries and the
`unrestricted` profile (which allows all egress anyway) are never limited here.

Two kinds, both pure (no sockets; the clock is injected):

- `label_limit`: per name, before anything goes upstream: the label the wildcard matched may be at most
  `max_label_length` characters, and a label of `config.RANDOM_MIN_LENGTH` or more may not look random: switch
  between letters and digits more than `max_label_alternations` times. Encoded data does (hex, base32 and base36
  text switch every 2-3 characters); names made of words and numbers (`prod-registry-k8s-io-us-east-1`: 2) do not.
  Shannon entropy was the other candidate and tells them apart worse: 32 characters of words joined together reach
  4.2 bits per character, as much as random base36 text. Short labels are never judged: CDN names
  (`d1a2b3c4.cloudfront.net`) are short and random-looking on purpose.
- `NameBudgets`: per sandbox, a sliding window (`budget_window` seconds) of the distinct names that went upstream
  and of those the upstream answered NXDOMAIN. A name already in the window keeps resolving however often it is
  asked (the sandbox's normal traffic survives); past `name_budget` distinct names, or `nxdomain_budget`
  NXDOMAINs, a *new* name is refused until the window moves on. So the upstream sees at most `name_budget` such
  names per window per sandbox. Memory is bounded: a window holds at most its budget's names (a refused name is
  not kept), and at most `MAX_SANDBOXES` windows are kept (the least recently active is forgotten first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, NamedTuple

from gateway.dns.config import RANDOM_MIN_LENGTH
from gateway.dns.wire import Code

__all__ = ["MAX_SANDBOXES", "Limited", "NameBudgets", "label_alternations", "label_limit"]

#: Sandbox windows kept at most; beyond this the least recently active one is forgotten.
MAX_SANDBOXES: Final = 10_000
#: Names a window keeps when only the NXDOMAIN budget is on (the name budget is 0, so it bounds nothing).
MAX_NAMES_UNBUDGETED: Final = 4096


class Limited(NamedTuple):
    """Why a name is refused: its stable code and the text the EDE and the records carry."""

    code: Code
    reason: str


#: Every digit to "0", every letter to "a", anything else to "-": a label's character classes, so that counting
#: "a0" and "0a" counts its switches (str.translate and str.count: no Python loop over the characters).
_CLASSES: Final = str.maketrans(
    {chr(c): "0" if chr(c).isdigit() else "a" if chr(c).isalpha() else "-" for c in range(128)}
)


def label_alternations(label: str) -> int:
    """How often the label switches between a letter and a digit (`a1b2`: 3; `web-2024`: 0, the hyphen between)."""
    classes = label.translate(_CLASSES)
    return classes.count("a0") + classes.count("0a")


def label_limit(labels: list[str], max_length: int, max_alternations: int) -> Limited | None:
    """The first of `labels` (the ones no policy entry spelled out) over a shape limit; 0 turns a limit off."""
    for label in labels:
        if max_length and len(label) > max_length:
            return Limited(
                Code.BLOCKED_LABEL_LENGTH,
                f"DNS_LABEL_LENGTH: label of {len(label)} characters under a wildcard entry, over "
                f"dns.max_label_length {max_length}",
            )
        if max_alternations and len(label) >= RANDOM_MIN_LENGTH:
            alternations = label_alternations(label)
            if alternations > max_alternations:
                return Limited(
                    Code.BLOCKED_LABEL_RANDOM,
                    f"DNS_LABEL_RANDOM: label under a wildcard entry looks random ({alternations} letter/digit "
                    f"alternations in {len(label)} characters, over dns.max_label_alternations {max_alternations})",
                )
    return None


class _Window:
    """One sandbox's names in the window: name -> (last time it went upstream, answered NXDOMAIN), oldest first."""

    __slots__ = ("names", "nxdomains")

    def __init__(self) -> None:
        self.names: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self.nxdomains = 0

    def expire(self, before: float) -> None:
        names = self.names
        while names:
            name, (seen, nxdomain) = next(iter(names.items()))
            if seen > before:
                return
            del names[name]
            self.nxdomains -= nxdomain


class NameBudgets:
    """Every sandbox's window (see the module doc). `admit` before a name goes upstream, `nxdomain` when the
    upstream answered that it does not exist. A budget of 0 is off; both 0: nothing is tracked."""

    def __init__(
        self,
        names: int,
        nxdomains: int,
        window: float,
        *,
        sandboxes: int = MAX_SANDBOXES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sandboxes = sandboxes
        self.clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self.reconfigure(names, nxdomains, window)

    def reconfigure(self, names: int, nxdomains: int, window: float) -> None:
        """New budgets (a reload): the names and NXDOMAINs already in each window count against them. Turned off,
        nothing more is tracked; turned on from off, every window starts empty."""
        self.names, self.nxdomains, self.window = names, nxdomains, window
        if not self.enabled:
            self._windows.clear()
        self._names_text = f"DNS_NAME_BUDGET: sandbox queried more than {names} distinct names in {window:g} s"
        self._nxdomains_text = (
            f"DNS_NXDOMAIN_BUDGET: sandbox got more than {nxdomains} NXDOMAIN answers in {window:g} s"
        )

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.nxdomains)

    def __len__(self) -> int:
        """Sandbox windows kept."""
        return len(self._windows)

    def tracked(self, sandbox_id: str) -> int:
        """Names the sandbox's window holds."""
        found = self._windows.get(sandbox_id)
        return len(found.names) if found is not None else 0

    def admit(self, sandbox_id: str, name: str) -> Limited | None:
        """None: `name` may go upstream (it is in the window from now on); else why it may not."""
        if not self.enabled:
            return None
        now = self.clock()
        window = self._windows.get(sandbox_id)
        if window is None:
            window = self._windows[sandbox_id] = _Window()
            while len(self._windows) > self.max_sandboxes:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(sandbox_id)
        window.expire(now - self.window)
        names = window.names
        seen = names.get(name)
        if seen is not None:
            names[name] = (now, seen[1])
            names.move_to_end(name)
            return None
        if self.names and len(names) >= self.names:
            return Limited(Code.REFUSED_NAME_BUDGET, self._names_text)
        if self.nxdomains and window.nxdomains >= self.nxdomains:
            return Limited(Code.REFUSED_NXDOMAIN_BUDGET, self._nxdomains_text)
        names[name] = (now, False)
        if not self.names and len(names) > MAX_NAMES_UNBUDGETED:
            window.nxdomains -= names.popitem(last=False)[1][1]
        return None

    def nxdomain(self, sandbox_id: str, name: str) -> None:
        """The upstream answered NXDOMAIN for an admitted name (counted once per name in the window)."""
        window = self._windows.get(sandbox_id)
        seen = window.names.get(name) if window is not None else None
        if window is not None and seen is not None and not seen[1]:
            window.names[name] = (seen[0], True)
            window.nxdomains += 1
