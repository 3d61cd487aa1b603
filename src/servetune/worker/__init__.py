"""The worker: a process on a GPU host that runs trial jobs from its ARQ queue with ``run_trial``,
sends heartbeats and ships its logs."""

ENGINE_LOGGER = "servetune.engine"
"""The logger a trial's engine output lines are logged under (so they are shipped to Redis with
source ENGINE); the worker's log file leaves them out, each trial's engine log holds them."""
