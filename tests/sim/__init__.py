"""A deterministic discrete-event simulator of cluster formation, for checking the election.

The machine under test is the real `agent.cluster.election.Formation`, unchanged; everything
around it is modelled, as harshly as the real pieces are, since a kinder stand-in hides split
brains:

- schedule.py: a run as plain values (arrivals, servers, loss, k3s speed, faults);
- world.py: the event heap, the network (per-packet loss, per-pair partitions, one-way and
  non-transitive too), the faults, and when a run is over; machine.py: one Pi (power, disk,
  /run, its daemons);
- avahi.py: avahi-daemon (probing, announcements, goodbyes, the cache a browser lists);
- agent.py: the agent as agent/daemon/formation.py runs the machine (ballot, publisher, live
  rounds, wire proofs, release);
- k3s.py: k3s and etcd (start delays, joins, learners and their refusals, quorum);
- outcome.py: the properties, checked over each whole run; strategies.py: hypothesis's
  schedules; __main__.py: figures, shrinking and traces (`python -m tests.sim --help`).

Not modelled (each noted where it would live): Avahi's TTL expiry and cache refresh queries
(no run lasts the 75 minutes of a PTR TTL) and its passive observation of failures (POOF); the
link going down (rounds never fail: a partition is modelled as a switch dropping packets);
name collisions; TCP loss (a proof's outcome is decided when it starts); k3s's own retries
beyond "exit, start again 5 s later"; 6443 answering while etcd has no quorum (the model
says such a server does not serve); processing time in the agent (its steps are instant);
K10 tokens (no proof is refused for a CA mismatch); `wipe`.
"""
