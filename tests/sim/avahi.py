"""One node's avahi-daemon: its entry group (probe, announcements, goodbye) and its cache.

What is modelled, with the source of each number:
- A new name is probed for 0.75-1.25 s (3 probes 250 ms apart after 0-250 ms, RFC 6762 §8.1;
  avahi-core/announce.c), with nothing on the wire meanwhile; then it is announced 3 times, at
  0, 1 and 3 s (+0-250 ms each: announce.c's n_iteration < 4, sec_delay doubling). A TXT update
  in place starts the announcements again with the new content.
- A withdrawn name that was announced gets one goodbye (TTL 0): a receiver drops it 1 s later
  (RFC 6762 §10.1) and its browser reports ItemRemove. A crashed daemon sends none.
- The cache keeps what it heard until a goodbye: a node that died without one stays listed for
  the whole run (its PTR TTL is 4500 s, longer than any run).
- A browser that starts lists the cache, stale entries included; the daemon then queries
  (RFC 6762 §5.2: 1 s, then doubling), and responders answer by multicast 20-120 ms later
  (RFC 6762 §6) unless the querier's known answers already hold their record (§7.1).
- Every packet to every receiver is lost independently and blocked by partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.cluster.election import NodeAdvert

if TYPE_CHECKING:
    from tests.sim.machine import Machine

PROBE = (0.75, 1.25)  # s from commit to established
ANNOUNCE_AT = (0.0, 1.0, 3.0)  # s after established, each + 0-250 ms (announce.c)
ANNOUNCE_JITTER = 0.25  # s
FLUSH = 1.0  # s from a goodbye to ItemRemove (RFC 6762 §10.1)
LATENCY = (0.0005, 0.004)  # s one packet takes on the LAN
ANSWER_DELAY = (0.02, 0.12)  # s a responder waits before a shared answer (RFC 6762 §6)
BROWSE_QUERIES = (0.0, 1.0, 3.0, 7.0, 15.0, 31.0)  # s after a browser starts (RFC 6762 §5.2)
ALL_FOR_NOW = 1.0  # s after a browser starts: Avahi's AllForNow
ESTABLISHED_CALLBACK = 0.005  # s: the pointers group's StateChanged over D-Bus


@dataclass
class Group:
    """Our entry group: one instance name and what its TXT says."""

    name: str
    advert: NodeAdvert
    token: int
    established: bool = False
    series: int = 0  # the current announcement series (a TXT update starts a new one)


@dataclass
class Cached:
    advert: NodeAdvert
    flush: int = 0  # != 0: a goodbye arrived; the removal that carries this number is due


class Avahi:
    """avahi-daemon on one machine."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.w = machine.world
        self.up = False
        self.inc = 0  # bumped at every start and stop: packets and timers of before are void
        self.cache: dict[str, Cached] = {}
        self.group: Group | None = None
        self._tokens = 0

    # -- the daemon's life --------------------------------------------------------------------

    def start(self) -> None:
        self.up, self.cache, self.group = True, {}, None
        self.inc += 1
        if self.m.agent is not None:
            self.m.agent.avahi_back()

    def stop(self, goodbye: bool) -> None:
        """SIGTERM (goodbye) or a crash or power cut (none): the group and cache go with it."""
        if not self.up:
            return
        established = self.established() is not None
        if goodbye:
            self.withdraw()
        self.up, self.cache, self.group = False, {}, None
        self.inc += 1
        if self.m.agent is not None:
            self.m.agent.avahi_gone(established)

    # -- publishing ---------------------------------------------------------------------------

    def register(self, name: str, advert: NodeAdvert) -> None:
        """Commit a group under a new name: probing first, nothing on the wire."""
        self.withdraw()
        if not self.up:
            return
        self._tokens += 1
        self.group = Group(name, advert, self._tokens)
        self.w.at(self.w.now + self.w.uniform(*PROBE), self._probed, self.inc, self._tokens)

    def update(self, advert: NodeAdvert) -> None:
        """UpdateServiceTxt: the same name, new TXT, announced again if established."""
        g = self.group
        if g is None:
            return
        g.advert = advert
        if g.established:
            self._announce_series(g)

    def withdraw(self) -> None:
        """Free the group: a goodbye if it was announced."""
        g, self.group = self.group, None
        if g is None or not g.established or not self.up:
            return
        for other in self.w.machines:
            if other is not self.m and self.w.packet(self.m.idx, other.idx):
                self.w.at(self.w.now + self.w.uniform(*LATENCY), other.avahi.goodbye_heard,
                          other.avahi.inc, g.name)

    def established(self) -> NodeAdvert | None:
        """What a query is answered with now, if anything."""
        g = self.group
        return g.advert if self.up and g is not None and g.established else None

    def _probed(self, inc: int, token: int) -> None:
        g = self.group
        if inc != self.inc or g is None or g.token != token:
            return
        g.established = True
        self._announce_series(g)
        self.w.at(self.w.now + ESTABLISHED_CALLBACK, self._tell_established, inc, token)

    def _tell_established(self, inc: int, token: int) -> None:
        g = self.group
        if inc == self.inc and g is not None and g.token == token and self.m.agent is not None:
            self.m.agent.established(g.name)

    def _announce_series(self, g: Group) -> None:
        g.series += 1
        for delay in ANNOUNCE_AT:
            at = self.w.now + delay + self.w.uniform(0.0, ANNOUNCE_JITTER)
            self.w.at(at, self._announce, self.inc, g.token, g.series)

    def _announce(self, inc: int, token: int, series: int) -> None:
        g = self.group
        if inc == self.inc and g is not None and g.token == token and g.series == series:
            self._multicast(g)

    def _multicast(self, g: Group) -> None:
        for other in self.w.machines:
            if other is not self.m and self.w.packet(self.m.idx, other.idx):
                self.w.at(self.w.now + self.w.uniform(*LATENCY), other.avahi.heard,
                          other.avahi.inc, g.name, g.advert)

    # -- the cache ----------------------------------------------------------------------------

    def heard(self, inc: int, name: str, advert: NodeAdvert) -> None:
        """An announcement or a multicast answer arrived."""
        if inc != self.inc or not self.up:
            return
        old = self.cache.get(name)
        self.cache[name] = Cached(advert)
        if (old is None or old.advert != advert) and self.m.agent is not None:
            self.m.agent.item(name, advert)

    def goodbye_heard(self, inc: int, name: str) -> None:
        entry = self.cache.get(name)
        if inc != self.inc or entry is None:
            return
        self._tokens += 1
        entry.flush = self._tokens
        self.w.at(self.w.now + FLUSH, self._flush, inc, name, self._tokens)

    def _flush(self, inc: int, name: str, flush: int) -> None:
        entry = self.cache.get(name)
        if inc != self.inc or entry is None or entry.flush != flush:
            return  # re-announced meanwhile: the record stays
        del self.cache[name]
        if self.m.agent is not None:
            self.m.agent.item_gone(name)

    # -- browsing -----------------------------------------------------------------------------

    def browse(self) -> None:
        """A browser starts: the queries go out (the listing is the caller's)."""
        for delay in BROWSE_QUERIES:
            self.w.at(self.w.now + delay, self._query, self.inc)

    def _query(self, inc: int) -> None:
        if inc != self.inc:
            return
        for other in self.w.machines:
            advert = other.avahi.established() if other is not self.m else None
            if advert is None or not self.w.packet(self.m.idx, other.idx):
                continue
            g = other.avahi.group
            assert g is not None
            known = self.cache.get(g.name)
            if known is not None and known.advert == advert and not known.flush:
                continue  # a known answer: suppressed (RFC 6762 §7.1)
            at = self.w.now + self.w.uniform(*ANSWER_DELAY)
            self.w.at(at, other.avahi._answer, other.avahi.inc, g.token)

    def _answer(self, inc: int, token: int) -> None:
        g = self.group
        if inc == self.inc and g is not None and g.token == token and g.established:
            self._multicast(g)
