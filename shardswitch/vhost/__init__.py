"""The vhost-user protocol: wire format shared by the back-end and the test front-end."""
