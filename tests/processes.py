"""Helpers for tests that start workers and commands in processes of their own."""

from urllib.parse import quote


def database_url_for_subprocesses() -> str:
    """DATABASE_URL for a worker or command started by a test: the test database, on SQLite or PostgreSQL."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = f"{quote(db['USER'], safe='')}:{quote(db['PASSWORD'], safe='')}@" if db["USER"] else ""
    return f"postgres://{credentials}{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"
