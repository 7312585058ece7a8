"""Database layer: declarative base, engine factory and sessions."""

from .base import Base
from .engine import make_engine
from .session import (
    ReadSessionDep,
    SessionDep,
    get_db,
    get_read_sessionmaker,
    get_sessionmaker,
    make_sessionmaker,
    session_scope,
)

__all__ = [
    "Base",
    "ReadSessionDep",
    "SessionDep",
    "get_db",
    "get_read_sessionmaker",
    "get_sessionmaker",
    "make_engine",
    "make_sessionmaker",
    "session_scope",
]
