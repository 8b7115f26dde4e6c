"""Web dashboard of the control plane."""
