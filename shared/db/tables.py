"""Table layouts of the records, derived from the pydantic models in :mod:`shared.schemas`.

Every table has a ``ts`` column (float epoch seconds) and column names equal to the model's
field names, so adding a field to a schema adds a column here without a second edit. Nested
models, lists and dicts are stored as JSON text. A few tables add columns of their own:

- ``requests.ts`` is ``finished_at`` (so every table filters and orders on ``ts``);
- ``decisions`` adds flat copies of the interesting parts of ``before`` / ``after``;
- ``telemetry`` is flattened to one row per GPU (``gpu_index`` NULL when there is none);
- ``workers.ts`` is ``started_at``.

Each :class:`Table` knows how to turn one model into its rows (:meth:`Table.rows`).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from shared.schemas import (
    CycleStats,
    Decision,
    GpuSample,
    OomEvent,
    RequestRecord,
    TelemetrySample,
    WorkerInfo,
)

Row = dict[str, Any]


class Kind(StrEnum):
    """How a column is stored; each backend maps it to a SQL type."""

    INT = "int"
    FLOAT = "float"
    TEXT = "text"
    BOOL = "bool"
    JSON = "json"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True)
class Table:
    """One table: its columns, the model it records and how a model becomes rows.

    ``unique`` names a column whose duplicates are ignored (``requests``) or, with
    ``upsert``, replace the stored row (``workers``). ``has_id`` adds an ``id`` key.
    """

    name: str
    model: type[BaseModel]
    columns: tuple[Column, ...]
    to_rows: Callable[[Any], list[Row]]
    unique: str | None = None
    upsert: bool = False
    has_id: bool = True

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def time_series(self) -> bool:
        """Pruned by age; ``workers`` is not."""
        return not self.upsert

    def has_column(self, name: str) -> bool:
        return name in self.column_names

    def rows(self, item: BaseModel) -> list[Row]:
        """The rows of one item, JSON columns encoded; TypeError for a wrong model."""
        if not isinstance(item, self.model):
            raise TypeError(f"table {self.name} records {self.model.__name__}, got {item!r}")
        json_columns = {c.name for c in self.columns if c.kind is Kind.JSON}
        return [
            {name: _encode(value) if name in json_columns else value for name, value in row.items()}
            for row in self.to_rows(item)
        ]


def kind_of(annotation: Any) -> Kind:
    """The storage kind of a field's annotation: scalars as themselves, the rest as JSON."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return kind_of(args[0])
    if get_origin(annotation) is Literal:
        return kind_of(type(args[0])) if len({type(a) for a in args}) == 1 else Kind.JSON
    if isinstance(annotation, type):
        # bool before int: bool is a subclass of int.
        for python_type, kind in ((bool, Kind.BOOL), (int, Kind.INT), (float, Kind.FLOAT)):
            if issubclass(annotation, python_type):
                return kind
        if issubclass(annotation, str | Enum):
            return Kind.TEXT
    return Kind.JSON


def model_columns(model: type[BaseModel], exclude: Iterable[str] = ()) -> tuple[Column, ...]:
    """One column per field of ``model`` (in field order), less ``exclude``."""
    skip = set(exclude)
    return tuple(
        Column(name, kind_of(field.annotation))
        for name, field in model.model_fields.items()
        if name not in skip
    )


def decode_row(table: Table, row: Row) -> Row:
    """A stored row as Python values: JSON decoded, SQLite's 0/1 back to bool."""
    out = dict(row)
    for column in table.columns:
        value = out.get(column.name)
        if value is None:
            continue
        if column.kind is Kind.JSON and isinstance(value, str):
            out[column.name] = json.loads(value)
        elif column.kind is Kind.BOOL:
            out[column.name] = bool(value)
    return out


def _encode(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _plain_rows(item: BaseModel) -> list[Row]:
    return [item.model_dump(mode="json")]


def _request_rows(item: RequestRecord) -> list[Row]:
    return [{"ts": item.finished_at, **item.model_dump(mode="json")}]


def _worker_rows(item: WorkerInfo) -> list[Row]:
    return [{"ts": item.started_at, **item.model_dump(mode="json")}]


def _decision_rows(item: Decision) -> list[Row]:
    flat = {
        "batch_size_before": item.before.batch_size,
        "batch_size_after": item.after.batch_size,
        "precision_after": item.after.precision,
        "max_seq_len_after": item.after.max_seq_len,
        "version_after": item.after.version,
    }
    return [{**item.model_dump(mode="json"), **flat}]


# Telemetry column <- GpuSample field; the GPU's name is prefixed so it can't be mistaken
# for the host.
_GPU_FIELDS = {
    "gpu_index": "index",
    "gpu_name": "name",
    "memory_used_bytes": "memory_used_bytes",
    "memory_total_bytes": "memory_total_bytes",
    "utilization_pct": "utilization_pct",
    "temperature_c": "temperature_c",
    "power_w": "power_w",
}
_SAMPLE_FIELDS = (
    "host_memory_used_bytes",
    "host_memory_total_bytes",
    "cpu_pct",
    "note",
)


def _telemetry_rows(item: TelemetrySample) -> list[Row]:
    """One row per GPU; a sample without GPUs still gives one (host-only) row."""
    sample: Row = {name: getattr(item, name) for name in ("ts", "host", *_SAMPLE_FIELDS)}
    gpus: list[GpuSample | None] = list(item.gpus) or [None]
    return [
        {
            **sample,
            **{col: None if gpu is None else getattr(gpu, f) for col, f in _GPU_FIELDS.items()},
        }
        for gpu in gpus
    ]


def _telemetry_columns() -> tuple[Column, ...]:
    sample = {c.name: c for c in model_columns(TelemetrySample)}
    gpu = {c.name: c for c in model_columns(GpuSample)}
    return (
        sample["ts"],
        sample["host"],
        *(Column(col, gpu[field].kind) for col, field in _GPU_FIELDS.items()),
        *(sample[name] for name in _SAMPLE_FIELDS),
    )


_DECISION_FLAT = (
    Column("batch_size_before", Kind.INT),
    Column("batch_size_after", Kind.INT),
    Column("precision_after", Kind.TEXT),
    Column("max_seq_len_after", Kind.INT),
    Column("version_after", Kind.INT),
)

TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        Table("cycles", CycleStats, model_columns(CycleStats), _plain_rows),
        Table(
            "requests",
            RequestRecord,
            (Column("ts", Kind.FLOAT), *model_columns(RequestRecord)),
            _request_rows,
            unique="request_id",
        ),
        Table("decisions", Decision, model_columns(Decision) + _DECISION_FLAT, _decision_rows),
        Table("oom_events", OomEvent, model_columns(OomEvent), _plain_rows),
        Table("telemetry", TelemetrySample, _telemetry_columns(), _telemetry_rows),
        Table(
            "workers",
            WorkerInfo,
            (Column("ts", Kind.FLOAT), *model_columns(WorkerInfo)),
            _worker_rows,
            unique="worker_id",
            upsert=True,
            has_id=False,
        ),
    )
}

TABLE_OF_MODEL: dict[type[BaseModel], Table] = {table.model: table for table in TABLES.values()}
