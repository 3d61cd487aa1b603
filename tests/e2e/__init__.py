"""End-to-end tests: a private Redis, a manager and workers started as real processes.

They drive the fleet the way a user does: the CLI, the REST API and the WebSockets.
"""
