"""Schema evolution rules shared by every engine: new columns evolve, anything else fails by name."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipelines.errors import SchemaEvolutionError

# Arrow types that differ only in physical layout; Delta stores them the same.
_SAME = {
    pa.large_string(): pa.string(),
    pa.string_view(): pa.string(),
    pa.large_binary(): pa.binary(),
    pa.binary_view(): pa.binary(),
}
# Lossless widenings a writer may send for an existing column.
_WIDENS = {
    (pa.int8(), pa.int16()), (pa.int8(), pa.int32()), (pa.int8(), pa.int64()),
    (pa.int16(), pa.int32()), (pa.int16(), pa.int64()), (pa.int32(), pa.int64()),
    (pa.float32(), pa.float64()),
}


def canonical(t: pa.DataType) -> pa.DataType:
    """The type with view/large layouts folded, recursively, so comparisons see meaning only."""
    if t in _SAME:
        return _SAME[t]
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(canonical(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(canonical(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, canonical(f.type), f.nullable) for f in t])
    if pa.types.is_map(t):
        return pa.map_(canonical(t.key_type), canonical(t.item_type))
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    return t


def canonical_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, canonical(f.type), f.nullable) for f in schema])


@dataclass(frozen=True)
class SchemaChange:
    """What writing `incoming` to a table with schema `current` would change."""

    added: tuple[str, ...]
    widened: tuple[str, ...]

    @property
    def evolves(self) -> bool:
        return bool(self.added)


def check_evolution(table: str, current: pa.Schema, incoming: pa.Schema) -> SchemaChange:
    """Allow added columns and lossless widening; raise SchemaEvolutionError naming anything else."""
    current, incoming = canonical_schema(current), canonical_schema(incoming)
    existing = {f.name.lower(): f for f in current}
    problems, added, widened = [], [], []
    for f in incoming:
        old = existing.get(f.name.lower())
        if old is None:
            added.append(f.name)
        elif old.name != f.name:
            problems.append(f"column {f.name!r} differs only in case from existing column {old.name!r}")
        elif old.type != f.type:
            if (f.type, old.type) in _WIDENS or pa.types.is_null(f.type):
                widened.append(f.name)
            else:
                problems.append(f"column {f.name!r} is {old.type} in the table but {f.type} in the new data")
    names = {f.name.lower() for f in incoming}
    for f in current:
        if f.name.lower() not in names and not f.nullable:
            problems.append(f"required column {f.name!r} ({f.type}) is missing from the new data")
    if problems:
        raise SchemaEvolutionError(
            f"cannot write to {table}: " + "; ".join(problems)
            + ". Only new nullable columns evolve a table: cast the data to the table's types,"
            " or write the changed column under a new name"
        )
    return SchemaChange(tuple(added), tuple(widened))


def conform(data: pa.Table, target: pa.Schema) -> pa.Table:
    """Cast `data`'s existing columns to the table's types (after check_evolution allowed it)."""
    types = {f.name: f.type for f in target}
    columns, fields = [], []
    for f, col in zip(data.schema, data.columns, strict=True):
        want = types.get(f.name)
        if want is not None and canonical(col.type) != canonical(want):
            col = col.cast(want)
        columns.append(col)
        fields.append(pa.field(f.name, col.type, f.nullable))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))
