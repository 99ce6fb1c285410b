"""Run stage: plugin discovery now; jobs (SQL state machine) and runners come next."""
