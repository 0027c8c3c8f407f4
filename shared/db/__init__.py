"""The records (database) layer: SQLite or Postgres behind one interface.

- :func:`open_records` / :class:`Records`: write and read the records synchronously.
- :class:`RecordWriter`: writes off the caller's thread, surviving database outages.
- :data:`TABLES`: the table layouts, derived from :mod:`shared.schemas`.
"""

from shared.db.records import DatabaseUnavailable, Records, RecordsError, open_records
from shared.db.tables import TABLES
from shared.db.writer import RecordWriter

__all__ = [
    "TABLES",
    "DatabaseUnavailable",
    "RecordWriter",
    "Records",
    "RecordsError",
    "open_records",
]
