"""A Python vhost-user front-end (the driver side: guest RAM in a memfd, split rings, handshake) for tests and benchmarks."""
