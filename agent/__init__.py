"""sugarkube-agent: forms a k3s cluster of Raspberry Pis over mDNS, safely."""

__version__ = "0.1.0"
