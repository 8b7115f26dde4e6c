"""REST API (FastAPI) of the control plane."""
