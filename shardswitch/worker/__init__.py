"""A worker process: one queue pair, its rings and its private packet path."""
