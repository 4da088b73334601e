"""A prompt file's images, row by row: each row's images read and checked, and a row of more images
than the engines take refused; every refusal names the file, the row (its line in a .jsonl file, see
`row_name`), the prompt id and the column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from rlhf_cluster.data.images import ImageError, row_images
from rlhf_cluster.data.row_names import row_name


def read_images(
    file: Path, table: pa.Table, column: str | None, ids: list[str], max_bytes: int
) -> list[tuple[bytes, ...]]:
    """Each row's images (`column`; none without one), every image read and checked: paths are
    relative to the file's folder (a save_to_disk folder's own)."""
    if column is None:
        return [()] * len(ids)
    base = file if file.is_dir() else file.parent
    out = []
    for row, (prompt_id, value) in enumerate(zip(ids, table.column(column).to_pylist())):
        try:
            out.append(row_images(value, base, max_bytes))
        except ImageError as exc:
            where = row_name(file, row, len(ids))
            raise ValueError(
                f"prompt file {file}: {where} (prompt_id {prompt_id!r}), column {column!r}: {exc}"
            ) from exc
    return out


def check_image_counts(
    file: Path, column: str | None, ids: list[str], images: list[tuple[bytes, ...]], limit: int | None
) -> None:
    """Refuses the first row with more than `limit` images (the engines take no more a prompt)."""
    over = [(row, n) for row, im in enumerate(images) if limit is not None and (n := len(im)) > limit]
    if over:
        row, n = over[0]
        where = row_name(file, row, len(ids))
        raise ValueError(
            f"prompt file {file}: {where} (prompt_id {ids[row]!r}), column {column!r}: {n} images, more than "
            f"data.max_images_per_prompt={limit} ({len(over)} such row(s)); raise it or drop images"
        )
