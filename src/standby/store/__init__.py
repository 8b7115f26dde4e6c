"""Persistence for the control plane: SQLAlchemy, SQLite by default, PostgreSQL in production."""
