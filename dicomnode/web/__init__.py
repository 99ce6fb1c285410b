"""The web console and REST API (FastAPI + Jinja2 + htmx): see ``docs/console.md``."""
