"""Alembic migrations for the normbench results schema (installed as ``normbench.migrations``)."""
