"""``shardswitch start``: from loaded settings to a running coordinator.

Theory of operation
-------------------
:func:`run` takes what the starter handed over (:func:`~shardswitch.coordinator.hosting.prepare`: inherited
sockets, the PID and log files, a capture), decides what needs reading before the sandbox hides it (the
``--runas`` user, the ``--control-group``, the host's addressing and resolvers, the conntrack timeouts, the
open-file limit), turns the settings into the workers' set-up (:class:`~shardswitch.ipc.WorkerSetup`: the
guest's parameters, the services left on, the address mappings) and hands it all to
:func:`~shardswitch.coordinator.server.run_coordinator`, which serves until told to stop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
from typing import TYPE_CHECKING

from shardswitch import systemd
from shardswitch.coordinator.access import AccessError, resolve_group
from shardswitch.coordinator.hosting import prepare
from shardswitch.coordinator.server import run_coordinator
from shardswitch.ipc import ForwardSetup, WorkerSetup
from shardswitch.logfile import LogFile
from shardswitch.net.endpoint import Service
from shardswitch.net.params import resolve
from shardswitch.sandbox import SandboxSetup
from shardswitch.sandbox.privileges import SandboxError, resolve_runas
from shardswitch.settings import NO_REPAIR
from shardswitch.worker.udptimeout import read_timeouts

if TYPE_CHECKING:
    from shardswitch.guest_addressing import GuestAddressing
    from shardswitch.settings import Config

log = logging.getLogger("shardswitch")


def services_left(cfg: "Config", addressing: "GuestAddressing") -> Service:
    """The guest services the settings and families leave on (--no-ndp takes router advertisements with it,
    --no-icmp NDP as in passt; -4 / -6 take a family's services with it)."""
    services = Service.ALL
    for off, service in ((cfg.no_dhcp, Service.DHCP), (cfg.no_ndp or cfg.no_icmp, Service.NDP | Service.RA),
                         (cfg.no_tcp, Service.TCP), (cfg.no_udp, Service.UDP),
                         (cfg.no_ra, Service.RA), (cfg.no_dhcpv6, Service.DHCPV6),
                         (not addressing.ipv4, Service.IPV4 | Service.DHCP),
                         (not addressing.ipv6, Service.IPV6 | Service.NDP | Service.RA | Service.DHCPV6)):
        if off:
            services &= ~service
    return services


def raise_nofile_limit() -> int:
    """Raise this process's open-file limit to its hard limit (workers inherit it): every flow holds a host
    socket, and `-t all` listens on tens of thousands of ports.  Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, err)
            return soft
    return hard


def run(cfg: "Config", log_file: LogFile | None = None) -> int:
    """``shardswitch start``: take what the starter handed over, resolve addressing (mirroring the host),
    then run the coordinator."""
    from shardswitch.guest_addressing import guest_params, host_addressing

    try:
        hosting = prepare(cfg, log_file)
    except systemd.ActivationError as err:
        log.error("%s", err)
        return 1

    log.debug("open-file limit: %d", raise_nofile_limit())
    sandbox: SandboxSetup | None = None
    if cfg.no_sandbox:
        log.warning("--no-sandbox: running with every privilege this process was started with")
    else:
        try:
            sandbox = SandboxSetup(resolve_runas(cfg.runas), os.environ.get("SHARDSWITCH_TEST_HOOKS") == "1",
                                   cfg.chroot_fallback)
        except SandboxError as err:
            log.error("%s", err)
            return 1
    try:
        hosting.control_group = resolve_group(cfg.control_group)      # before the sandbox hides /etc
    except AccessError as err:
        log.error("%s", err)
        return 1

    addressing = host_addressing(cfg)
    params = guest_params(cfg, addressing)
    if cfg.no_map_gw:
        mapped: tuple[str, ...] = ()
    elif cfg.map_host_loopback is not None:
        mapped = (cfg.map_host_loopback,)
    else:
        # The gateway, the IPv6 router address NDP gives the guest (the gateway when link-local, else our
        # link-local address) and the IPv6 gateway.
        resolved = resolve(params)
        mapped = tuple(dict.fromkeys(
            [params.gateway] + [str(ipaddress.IPv6Address(a)) for a in (resolved.router_ll6, resolved.gateway6)]))
    log.info("guest traffic to %s goes to the host's loopback", ", ".join(mapped) or "no address")
    for guest_side, resolver in addressing.dns_forward.items():
        log.info("guest DNS queries to %s go to the host's resolver %s", guest_side, resolver)
    outbound = tuple(a for a in (cfg.outbound, cfg.outbound6) if a is not None)
    forward = ForwardSetup(map_host_loopback=mapped, dns_forward=tuple(addressing.dns_forward.items()),
                           map_guest_addr=cfg.map_guest_addr or "",
                           outbound=outbound, outbound_if4=cfg.outbound_if4 or "",
                           outbound_if6=cfg.outbound_if6 or "", deny=tuple(cfg.deny),
                           allow_link_local=cfg.allow_link_local)
    setup = WorkerSetup(pair=0, params=params, reflect=cfg.reflect, forward=forward,
                        services=int(services_left(cfg, addressing)), icmp=not cfg.no_icmp,
                        trace=cfg.trace, migrate_linger=not cfg.migrate_no_linger,
                        udp_timeouts=read_timeouts())          # before the sandbox
    return run_coordinator(workers=cfg.workers, setup=setup, socket_path=hosting.socket_path,
                           control_path=hosting.control_path, connect=cfg.connect is not None,
                           print_fragment=not cfg.quiet, max_flows=cfg.max_flows,
                           ports=(tuple(cfg.tcp_ports), tuple(cfg.udp_ports)), sandbox=sandbox,
                           repair_path="" if hosting.repair_path == NO_REPAIR else hosting.repair_path,
                           hosting=hosting)
