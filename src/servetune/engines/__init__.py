"""Engine adapters: turn params into a launch command, know each engine's flags and failure modes."""
