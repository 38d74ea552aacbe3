"""The operator's malware-domain list: a table the DNS decision matches names against, reloaded by its owner."""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway.files import FileWatch, read_regular_file

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------- malware blocklist


_HOSTS_BOILERPLATE: Final = frozenset(
    {"localhost", "localhost.localdomain", "local", "broadcasthost", "ip6-localhost", "ip6-loopback", "0.0.0.0"}
)


class DomainBlocklist:
    """Operator malware-domain list: hosts-file lines (`0.0.0.0 bad.example`) or one name per line, `#` comments.

    A listed domain blocks its subdomains too. Its owner (the interceptor, before each decision it hands the
    list to) calls `maybe_reload`, which re-reads the file when its signature changed (`FileWatch`),
    checked at most every `check_interval` seconds, so `match` in the decision path never touches the disk.
    A missing or unreadable file blocks nothing new and keeps the last good list (an operator's typo must not
    cut DNS for every sandbox, nor silently drop the list).
    `generation` counts the lists read, so answers decided under an older list can be told apart.
    """

    def __init__(self, path: Path, check_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.check_interval = check_interval
        self._clock = clock
        self._domains: dict[str, int] = {}  # domain -> line number
        self._watch = FileWatch([self.path])
        self._checked = clock()
        self.error: str | None = None
        self.generation = 0
        self._reload()

    @staticmethod
    def parse(lines: Iterable[str]) -> dict[str, int]:
        domains: dict[str, int] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            tokens = line.split()
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(tokens[0].split("%", 1)[0])
                tokens = tokens[1:]  # hosts-file format: the address is not a name
            for token in tokens:
                name = token.strip().rstrip(".").lower()
                if not name or name in _HOSTS_BOILERPLATE or "." not in name:
                    continue
                domains.setdefault(name, number)
        return domains

    def _reload(self) -> None:
        if not self._watch.changed():
            return
        try:
            text = read_regular_file(self.path).decode("utf-8", "replace")
        except OSError as exc:  # also a directory, FIFO or oversized file put in its place
            self.error = f"{self.path}: {exc.strerror or exc}"
            self._watch.forget()  # read it again at the next check, whatever its signature then
            return
        self._domains = self.parse(text.splitlines())
        self.error = None
        self.generation += 1

    def maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked >= self.check_interval:
            self._checked = now
            self._reload()

    def match(self, name: str) -> tuple[str, int] | None:
        """(listed domain, line) when `name` is that domain or below it. Pure: reloading is `maybe_reload`'s."""
        if not self._domains:
            return None
        candidate = name
        while True:
            line = self._domains.get(candidate)
            if line is not None:
                return candidate, line
            dot = candidate.find(".")
            if dot < 0:
                return None
            candidate = candidate[dot + 1 :]

    def __len__(self) -> int:
        return len(self._domains)
