"""The manager's REST routes, one module per resource: studies, workers, health.

Each route calls a repository, the registry or the supervisor; none holds SQL or Redis calls.
"""
