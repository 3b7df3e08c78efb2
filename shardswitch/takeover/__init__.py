"""Taking over a running shardswitch without a blip (issue 23; design in docs/takeover.md).

:mod:`.wire` holds the hand-over channel's messages and version negotiation;
the two sides' steps come with their processes.
"""
