"""The lab's stand-in for k3s: what a node's k3s shows the network and its disk, without Kubernetes.

Run inside a node once `sugarkube-agent gate` let it, as k3s would be (`python3 -m
tests.lab.k3s_standin server|agent`, see cli.py). It reads k3s's merged config (config.yaml, then
config.yaml.d/*.yaml: our gate's drop-in among them; agent/cluster/k3s.py merges them as k3s
does) and behaves as k3s does where split-brain testing looks:

- servers run a real etcd (Debian's etcd-server 3.4) per node, a child in the stand-in's process
  group: `cluster-init` starts a new etcd cluster, `server:` joins through the server as a learner
  that the etcd leader's learner manager promotes, a second concurrent learner is refused as etcd
  refuses it, and the refused server exits 1 as k3s before v1.26.5 does. "One cluster" is what
  etcd says: the same cluster ID and the same voting members on every server (etcd.py);
- state lands where k3s keeps it, early (CA, token, server/db/etcd), and a restart starts from it
  (disk.py); 6443 opens only after a start-to-serve delay and once the datastore can answer
  (service.py); joins pin the CA to the token's hash before any credential is sent (client.py).

What it is based on, read in k3s's pkg/etcd/etcd.go (v1.22 and v1.30) and measured with etcd
3.4.23 on the lab machine:
- join: MemberList, MemberAddAsLearner with the joiner's peer URL (a member that already has the
  joiner's address, named or not yet started, is reused rather than added again; another member
  of the same node name is refused: "duplicate node name"), then etcd with the initial-cluster
  string and state `existing`. Before v1.26.5 a failed join was fatal; later k3s retries every
  1 s on ErrTooManyLearners and ErrUnhealthy. The systemd unit's Restart=always, RestartSec=5s
  retries ours (tests/integration/formation.py does the same in the lab).
- manageLearners: every 15 s (manageTickerTime), on the etcd leader only, try MemberPromote on
  the first learner; if it is not caught up, track its raftAppliedIndex and remove it after
  5 minutes without progress (learnerMaxStallTime). Measured: promotion succeeds ~0.6 s after a
  learner's etcd starts; the lab shortens the 15 s tick (K3S_STANDIN_LEARNER_TICK).
- etcd flags: heartbeat 500 ms, election 5000 ms, snapshot-count 10000; data dir
  server/db/etcd (mode 0700), member name `<node>-<8 hex>` kept in server/db/etcd/name,
  "initialized" means server/db/etcd/member/wal exists. With these timings a new single-member
  cluster has a leader ~3.5 s after etcd starts (0.13 s with etcd's own 100/1000 ms defaults).
- etcd 3.4 allows one learner (no flag raises it): a second MemberAdd(IsLearner) answers
  "etcdserver: too many learner members in cluster" until the first is promoted or removed.
  Its strict reconfig check also refuses any MemberAdd until every voter has been connected to
  the leader for 5 s (etcdserver HealthInterval): a join right after a promotion, or right after
  a restart, meets "etcdserver: unhealthy cluster" (reason etcd_unhealthy), as k3s's does.
- the cluster ID is a hash of the initial members' peer URLs and the cluster token (k3s leaves
  it at etcd's default), not of member names: a node that wipes its state and runs cluster-init
  again at the same address gets its old cluster ID back. Compare member names too.
"""
