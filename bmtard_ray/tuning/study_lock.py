"""A SQLite Optuna study that another process holds locked: one line naming the file and the lock.

SQLite lets one writer at a time hold a database; a process inside ``BEGIN EXCLUSIVE`` (or a long write)
keeps every other one out, and Optuna then fails after its own wait with ``StorageInternalError`` and a
traceback, without a word of a lock. ``--review`` (which reads the study) and ``--resume`` (which writes it)
ask first, briefly, and name the file instead.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from bmtard_ray.errors import ConfigError

WAIT_S = 5.0


def check_unlocked(db: Path, *, write: bool, what: str, wait_s: float = WAIT_S) -> None:
    """Raise ConfigError when ``db`` stays locked for ``wait_s``: ``write`` asks for the write lock a search
    takes (``BEGIN IMMEDIATE``), else for a read. A file that is not there is left to the caller."""
    if not db.is_file():
        return
    try:
        conn = sqlite3.connect(f"file:{db}?mode={'rw' if write else 'ro'}", uri=True, timeout=wait_s)
    except sqlite3.Error:
        return  # not openable at all: the caller's own check says why
    try:
        if write:
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()
        else:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            return
        lock = "the write lock" if write else "a read"
        raise ConfigError(f"{what}: the Optuna study database {db} is locked by another process (SQLite refused "
                          f"{lock} for {wait_s:g} s: {exc}); wait for that process to finish or stop it "
                          f"(`fuser {db}` names it), then try again") from None
    finally:
        conn.close()
