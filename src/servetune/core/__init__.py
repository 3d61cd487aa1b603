"""Pure domain of servetune: specs, search spaces, trials, metrics, SLOs and scoring.

Nothing here performs I/O, reads the clock or keeps global state; an import-linter contract keeps it so.
"""
