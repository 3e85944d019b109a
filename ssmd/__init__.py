"""ssmd keeps a Redis cache of a PostgreSQL security master consistent with the database."""

__version__ = "0.1.0"
