"""Database layer, without the web framework: scripts, workers and tests use it as it is."""

from .base import Base
from .database import Database
from .engine import make_engine
from .session import make_sessionmaker, session_scope

__all__ = ["Base", "Database", "make_engine", "make_sessionmaker", "session_scope"]
