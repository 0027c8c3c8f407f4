"""Writing records off the caller's thread, through database outages, losing nothing.

``RecordWriter.submit(item)`` only appends to an in-memory inbox. A background thread
moves the inbox into a buffer (one queue per table) and writes it in batches every
``flush_interval_s`` or as soon as ``batch_size`` items wait.

When the database does not answer (:class:`DatabaseUnavailable`) the rows stay buffered
and the write is retried with exponential backoff; one warning is logged per outage and
one info line when it ends. When the buffer grows past ``max_buffer`` items it is spilled
to a JSONL file in ``spill_dir``; once the database answers again the spill files are
replayed (streamed, in batches) and deleted. Spill files left by an earlier process in the
same directory are claimed and replayed at start, so give each writer process its own
``spill_dir``. A batch the database *refuses* (a bad row, not an outage) is retried row by
row and only the offending rows are dropped, with an error log.

With ``retention_hours > 0`` the writer also prunes old rows every ``prune_every_s``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from shared.db.backends import backend_for
from shared.db.records import DatabaseUnavailable, Records, open_records
from shared.db.tables import TABLE_OF_MODEL, TABLES

log = logging.getLogger(__name__)

Opener = Callable[[], Records]


@dataclass
class WriterStats:
    """Counts since the writer started (read from any thread; approximate while running)."""

    written: int = 0
    dropped: int = 0
    spilled: int = 0
    outages: int = 0


class RecordWriter:
    """Batched, non-blocking, outage-proof writes of record models; see the module doc."""

    def __init__(
        self,
        target: str | Records | Opener,
        *,
        spill_dir: str | Path | None = None,
        retention_hours: float = 0.0,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        max_buffer: int = 100_000,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        prune_every_s: float = 3600.0,
    ) -> None:
        """``target``: a database URL, an open :class:`Records` (not closed by the writer)
        or a function opening one (called again until it succeeds).

        ValueError for a bad URL or bad limits; the database itself is not touched here.
        """
        if batch_size < 1 or max_buffer < batch_size or flush_interval_s <= 0:
            raise ValueError("need batch_size >= 1, max_buffer >= batch_size, interval > 0")
        self._opener, self._records, self._owns_records = _resolve(target)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.retention_s = retention_hours * 3600.0
        self.batch_size, self.max_buffer = batch_size, max_buffer
        self.flush_interval_s, self.prune_every_s = flush_interval_s, prune_every_s
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self.stats = WriterStats()
        self._unreplayed = 0  # records in this writer's own spill files
        self._cond = threading.Condition()
        self._inbox: deque[BaseModel] = deque()
        self._idle = True
        self._buffer: dict[str, deque[BaseModel]] = {name: deque() for name in TABLES}
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._backoff, self._retry_at, self._outage_since = retry_initial_s, 0.0, 0.0
        self._next_prune = 0.0
        self._spill_path: Path | None = None
        self._spill_files: list[Path] = self._claim_spill_files()
        self._idle = not self._spill_files
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------

    def submit(self, item: BaseModel) -> None:
        """Queue one record model for writing; never blocks. TypeError for other objects,
        RuntimeError after :meth:`close`."""
        if type(item) not in TABLE_OF_MODEL:
            raise TypeError(f"not a record model: {type(item).__name__}")
        if self._stopping.is_set():
            raise RuntimeError("RecordWriter is closed")
        with self._cond:
            self._inbox.append(item)
            self._idle = False
            full = len(self._inbox) >= self.batch_size
        if full:
            self._wake.set()

    def submit_many(self, items: Iterable[BaseModel]) -> None:
        for item in items:
            self.submit(item)

    @property
    def pending(self) -> int:
        """Records accepted but not yet in the database (inbox, buffer, own spill files)."""
        buffered = sum(len(q) for q in self._buffer.values())
        return len(self._inbox) + buffered + self._unreplayed

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything queued now (retrying at once if in backoff); whether all of
        it reached the database within ``timeout`` seconds."""
        with self._cond:
            if self._idle:
                return True
            self._retry_at = 0.0
            self._wake.set()
            return self._cond.wait_for(lambda: self._idle, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop after a last attempt to write; what is still unwritten is spilled to disk
        (or, without a spill dir, reported as lost). Idempotent."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._retry_at = 0.0
            self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("record writer still busy after %.1fs; leaving it to finish", timeout)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping.is_set()
            try:
                self._step()
            except Exception:  # a bug here must not end the thread and strand the records
                log.exception("record writer step failed; continuing")
            if stopping:
                break
        self._finish()

    def _step(self) -> None:
        self._take_inbox()
        if time.monotonic() >= self._retry_at:
            self._attempt()
        self._bound_buffer()
        self._maybe_prune()
        self._update_idle()

    def _take_inbox(self) -> None:
        with self._cond:
            items, self._inbox = self._inbox, deque()
        for item in items:
            self._buffer[TABLE_OF_MODEL[type(item)].name].append(item)

    def _update_idle(self) -> None:
        with self._cond:
            buffered = any(self._buffer.values())
            self._idle = not (self._inbox or buffered or self._spill_files)
            self._cond.notify_all()

    def _attempt(self) -> None:
        """Write the buffer, then replay spill files; on an outage, schedule a retry."""
        try:
            self._drain_buffer()
            while self._spill_files:
                self._replay(self._spill_files[0])
                self._spill_files.pop(0)
        except DatabaseUnavailable as exc:
            self._on_outage(exc)
            return
        self._on_success()

    def _open(self) -> Records:
        if self._records is None:
            assert self._opener is not None
            try:
                self._records = self._opener()
            except DatabaseUnavailable:
                raise
            except Exception as exc:  # whatever the opener raises, retry it later
                raise DatabaseUnavailable(f"cannot open the records: {exc}") from exc
        return self._records

    def _drain_buffer(self) -> None:
        for table, queue in self._buffer.items():
            while queue:
                self._write_chunk(table, queue, min(len(queue), self.batch_size))

    def _write_chunk(self, table: str, queue: deque[BaseModel], count: int) -> None:
        """Write the first ``count`` items of ``queue`` and remove them; raises
        DatabaseUnavailable with the queue untouched."""
        records = self._open()
        chunk = list(itertools.islice(queue, count))
        try:
            records.add(table, chunk)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.warning(
                "database refused a batch of %d %s (%s); retrying row by row", count, table, exc
            )
            self._write_one_by_one(records, table, queue, count)
            return
        self._consume(queue, count, written=True)

    def _write_one_by_one(
        self, records: Records, table: str, queue: deque[BaseModel], count: int
    ) -> None:
        for _ in range(count):
            try:
                records.add(table, [queue[0]])
            except DatabaseUnavailable:
                raise
            except Exception as exc:
                log.error("dropping a %s record the database refuses: %s: %r", table, exc, queue[0])
                self._consume(queue, 1, written=False)
                continue
            self._consume(queue, 1, written=True)

    def _consume(self, queue: deque[BaseModel], count: int, *, written: bool) -> None:
        for _ in range(count):
            queue.popleft()
        if written:
            self.stats.written += count
        else:
            self.stats.dropped += count

    def _on_outage(self, exc: Exception) -> None:
        now = time.monotonic()
        if not self._outage_since:
            self._outage_since = now
            self.stats.outages += 1
            log.warning("database unavailable (%s); keeping %d records to retry", exc, self.pending)
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.retry_max_s)

    def _on_success(self) -> None:
        if self._outage_since:
            log.info(
                "database back after %.1fs; buffered records written",
                time.monotonic() - self._outage_since,
            )
        self._outage_since = 0.0
        self._backoff = self.retry_initial_s

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if self.retention_s <= 0 or self._outage_since or now < self._next_prune:
            return
        self._next_prune = now + self.prune_every_s
        try:
            deleted = self._open().prune(time.time() - self.retention_s)
        except DatabaseUnavailable as exc:
            self._on_outage(exc)
            return
        except Exception as exc:  # pruning is upkeep: retry at the next interval
            log.warning("pruning old records failed: %s", exc)
            return
        if deleted:
            log.info("pruned %d records older than %.1f h", deleted, self.retention_s / 3600)

    def _finish(self) -> None:
        self._take_inbox()
        left = sum(len(q) for q in self._buffer.values())
        if left:
            self._spill_buffer() if self.spill_dir else self._drop_buffer("writer closed")
        self._update_idle()
        if self._owns_records and self._records is not None:
            self._records.close()

    # -- spilling ------------------------------------------------------------------------

    def _bound_buffer(self) -> None:
        if sum(len(q) for q in self._buffer.values()) <= self.max_buffer:
            return
        if self.spill_dir is None:
            self._drop_buffer("buffer full and no spill dir")
        else:
            self._spill_buffer()

    def _spill_buffer(self) -> None:
        """Append the whole buffer to this writer's spill file and empty it."""
        assert self.spill_dir is not None
        if self._spill_path is None:
            self._spill_path = (
                self.spill_dir / f"records-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            )
        lines = [
            json.dumps({"table": table, "item": item.model_dump(mode="json")}) + "\n"
            for table, queue in self._buffer.items()
            for item in queue
        ]
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with self._spill_path.open("a", encoding="utf-8") as f:
                f.writelines(lines)
        except OSError as exc:  # keep them in memory rather than lose them
            log.error("cannot spill %d records to %s: %s", len(lines), self._spill_path, exc)
            return
        if self._spill_path not in self._spill_files:
            self._spill_files.append(self._spill_path)
        for queue in self._buffer.values():
            queue.clear()
        self.stats.spilled += len(lines)
        self._unreplayed += len(lines)
        log.warning("spilled %d records to %s", len(lines), self._spill_path)

    def _drop_buffer(self, why: str) -> None:
        count = sum(len(q) for q in self._buffer.values())
        log.error("losing %d unwritten records: %s", count, why)
        for queue in self._buffer.values():
            queue.clear()
        self.stats.dropped += count

    def _replay(self, path: Path) -> None:
        """Load ``path`` into the buffer batch by batch and write it; on an outage the
        unread rest stays in the file (what was loaded stays buffered)."""
        if not path.exists():
            return
        with path.open(encoding="utf-8") as f:
            while lines := list(itertools.islice(f, self.batch_size)):
                self._load_lines(lines, own=path == self._spill_path)
                try:
                    self._drain_buffer()
                except DatabaseUnavailable:
                    _rewrite(path, f.read())
                    raise
        path.unlink(missing_ok=True)
        if path == self._spill_path:
            self._spill_path = None
        log.info("replayed spilled records from %s", path)

    def _load_lines(self, lines: list[str], *, own: bool) -> None:
        for line in lines:
            if own:
                self._unreplayed -= 1
            try:
                raw = json.loads(line)
                table = TABLES[raw["table"]]
                self._buffer[table.name].append(table.model.model_validate(raw["item"]))
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                log.error("skipping an unreadable spilled record: %s", exc)
                self.stats.dropped += 1

    def _claim_spill_files(self) -> list[Path]:
        """Spill files an earlier writer left in ``spill_dir``, renamed to be ours."""
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return []
        claimed = []
        for path in sorted(self.spill_dir.glob("*.jsonl")):
            mine = path.with_name(f"claimed-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl")
            try:
                path.rename(mine)  # atomic: two writers can't both claim a file
            except OSError:
                continue
            claimed.append(mine)
        if claimed:
            log.info("found %d spill files of an earlier run in %s", len(claimed), self.spill_dir)
        return claimed


def _rewrite(path: Path, rest: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rest, encoding="utf-8")
    os.replace(tmp, path)


def _resolve(target: str | Records | Opener) -> tuple[Opener | None, Records | None, bool]:
    """(opener, records, whether the writer closes them) for a writer's target."""
    if isinstance(target, Records):
        return None, target, False
    if isinstance(target, str):
        backend_for(target)  # fail fast on a bad URL, without connecting

        def opener() -> Records:
            return open_records(target)

        return opener, None, True
    return target, None, True
