"""Sans-IO packet codecs and the guest-facing protocol logic (ARP, DHCPv4, dispatch).

Nothing in this package touches sockets, files or the clock; see
:mod:`shardswitch.net.endpoint` for the entry point.
"""

from .drop import DropReason, PacketError
from .endpoint import GuestEndpoint
from .params import GuestParams, ParamsError

__all__ = ["DropReason", "GuestEndpoint", "GuestParams", "PacketError", "ParamsError"]
