"""The worker: a process on a GPU host that runs trial jobs from its ARQ queue with ``run_trial``,
sends heartbeats and ships its logs."""
