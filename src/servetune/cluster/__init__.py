"""The Redis side of the fleet: key names, the typed messages that cross Redis, the job queue
(ARQ), the result stream, the worker registry and the log handler.

Both the manager and the workers import from here; they never import each other.
"""
