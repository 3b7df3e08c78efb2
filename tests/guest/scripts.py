"""Shell fragments the guest scripts of several tests share."""

#: Sets ``$gw`` to the guest's default gateway (as DHCP gave it).
GATEWAY = "gw=$(ip route | awk '/default/ {print $3}')"

#: Resolve the gateway's MAC first: requests queued behind an ARP resolution leave
#: from the CPU that receives the ARP reply, whatever CPU their sender is pinned to
#: (so both would leave on that CPU's queue pair).
WARM_UP = "ping -c 1 -W 3 $gw > /dev/null"
