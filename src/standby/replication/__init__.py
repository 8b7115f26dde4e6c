"""Data plane: change sources, wire protocol, sender, receiver, replica store. No database, no HTTP."""
