"""Route modules of the REST API, one per topic (see api/app.py)."""
