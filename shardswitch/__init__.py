"""shardswitch: a user-mode network back-end for virtual machines over vhost-user."""
__version__ = "0.1.0"
