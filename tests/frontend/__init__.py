"""Tests of the vhost-user test front-end (shardswitch.frontend)."""
