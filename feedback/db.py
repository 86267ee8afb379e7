"""Database connections in processes forked from one that has them (the parallel export's helpers)."""

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

# The connections a forked process inherited: referenced until it exits, never used or closed.
_inherited: list[BaseDatabaseWrapper] = []


def use_own_connections() -> None:
    """In a process just forked: set aside every database connection it inherited, so it opens its own.

    A forked process shares its parent's sockets and file handles. Querying an inherited connection
    mixes two processes' messages in one session; closing it ends the parent's session too (on
    PostgreSQL the Terminate message goes over the shared socket, and SQLite's handle must never be
    used across a fork). Closing the connections in the parent before forking is not enough: it
    closes only those its own thread sees, and a connection opened before an asyncio event loop
    started running in that thread stays in asgiref's thread-local layer, out of reach there but
    what a forked process, which has no running loop, sees as its connection. So the child replaces
    each one with a new, unopened connection to the same database, and keeps the inherited ones
    referenced, unclosed, so that nothing finalises them before the process exits.
    """
    for alias in connections:
        _inherited.append(connections[alias])
        connections[alias] = connections.create_connection(alias)
