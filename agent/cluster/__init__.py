"""Cluster formation: election and gates as pure state machines, probes and k3s files as I/O."""
