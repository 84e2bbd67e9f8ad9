"""A lab of real nodes on one machine: network namespaces with their own avahi-daemon and bus."""

from tests.lab.cleanup import find_leftovers, sweep_leftovers, unavailable_reason
from tests.lab.errors import LabError
from tests.lab.lab import Lab
from tests.lab.node import Node

__all__ = ["Lab", "LabError", "Node", "find_leftovers", "sweep_leftovers", "unavailable_reason"]
