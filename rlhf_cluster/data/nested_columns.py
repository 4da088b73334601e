"""Columns named by a dotted path into a nested (struct) column: `reward_model.ground_truth`,
`extra_info.index`, as verl's preprocessed parquet files nest the answer and the row's index
(`data.columns`). A name that is a column of its own is that column; otherwise its first part is
a column and each further part a field of the struct before it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


def with_nested_columns(file: Path, table: pa.Table, names: Iterable[str | None]) -> pa.Table:
    """`table` with a column for each dotted name of `names` that is no column of its own, read
    from the struct fields it names. A name whose first part is no column is left to the caller's
    check for missing columns; a part that is no field of its struct is a ValueError naming the
    file, the name and the fields there are."""
    for name in dict.fromkeys(n for n in names if n and "." in n and n not in table.column_names):
        head, *path = name.split(".")
        if head not in table.column_names:
            continue
        column, where = table.column(head), head
        for part in path:
            fields = [column.type.field(i).name for i in range(column.type.num_fields)] if _is_struct(column) else None
            if fields is None:
                raise ValueError(
                    f"prompt file {file}: column {name!r} (data.columns): {where!r} holds {column.type}, not a struct "
                    f"with a field {part!r}"
                )
            if part not in fields:
                raise ValueError(f"prompt file {file}: column {name!r} (data.columns): {where!r} has no field {part!r} "
                                 f"(its fields: {fields})")  # fmt: skip
            column, where = pc.struct_field(column, part), f"{where}.{part}"
        table = table.append_column(name, column)
    return table


def _is_struct(column: pa.ChunkedArray) -> bool:
    return pa.types.is_struct(column.type)
