"""One module per resource of the console: ``api`` (JSON under /api) and ``pages`` (HTML)."""
