"""Send stage: results to destinations (C-STORE SCU) with retries and dead letters."""
