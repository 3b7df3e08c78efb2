"""The coordinator process: vhost-user connection, device state, worker supervision, control socket."""
