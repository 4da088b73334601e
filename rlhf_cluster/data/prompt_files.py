"""A job's prompts from one prompt file or a list of them (`data.path`, `data.eval_path`; veRL's
`data.train_files` / `data.val_files`), read as one prompt set in the listed order.

One file (a string, or a list of one) reads exactly as `read_prompt_file` does: the same prompt
ids, order, sources and errors. Keep a list as it is across a resume: a file added, removed or moved
renames the positional ids (and changes an `eval_fraction` split, which the job then warns of).
Several files, each read by `read_prompt_file` with the same `columns`:

- each file has a label: its stem (a folder's name); files that share a stem are labelled with
  their parent folder's name too (`gsm8k/train`, `math/train`), and by their index where that
  still repeats (`0:train`);
- positional ids (no `prompt_id` column) are `<label>/row-<n>`, so two files' rows never share
  one; ids from a `prompt_id` column are kept, and one that is in two files is refused, naming it
  and both files;
- without `data.columns.source`, each prompt's `source` is its file's label: held-out evaluation
  then reports accuracy per file (`eval_accuracy/<label>`), and a reward function's `source`
  keyword names the file;
- every error names the file's place in the list (`data.path[1]: prompt file ...`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlhf_cluster.config import DataConfig, PromptColumns
from rlhf_cluster.data.prompts import MAX_IMAGE_BYTES, Prompt, prepare_prompt_files, read_prompt_file

PathOrList = str | Path | list[str] | list[Path] | list[str | Path]


def as_paths(value: PathOrList | None) -> list[Path]:
    """The files a `data.path` / `data.eval_path` value names, in order (empty: None)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str | Path) else list(value)
    return [Path(item).expanduser() for item in items]


def describe(files: list[Path]) -> str:
    """The files as messages name them: one file's path, or the list's."""
    return str(files[0]) if len(files) == 1 else "[" + ", ".join(str(f) for f in files) + "]"


def file_labels(files: list[Path]) -> list[str]:
    """Each file's label (its stem; with its parent folder's name where stems repeat; with its
    index where that still repeats): the prefix of its positional ids and its prompts' source."""
    files = [f.resolve() for f in files]  # `./a.parquet`'s folder is the one it is in; `.` has a name
    stems = [f.name if f.is_dir() else f.stem for f in files]
    labels = [f"{f.parent.name}/{s}" if stems.count(s) > 1 and f.parent.name else s for f, s in zip(files, stems)]
    return [f"{i}:{s}" if labels.count(label) > 1 else label for i, (s, label) in enumerate(zip(stems, labels))]


def job_prompt_files(cfg: DataConfig, run_dir: str | Path) -> tuple[PathOrList, PathOrList | None]:
    """The train and held-out prompt files of a job as `read_prompts` takes them: the user's `path`
    and `eval_path` as written (a file or a list each: a file's errors stay its own), or the
    built-in task's (written under `run_dir`, see `prepare_prompt_files`)."""
    if cfg.path is not None:
        return cfg.path, cfg.eval_path
    return prepare_prompt_files(cfg, run_dir)


def read_prompts(
    value: PathOrList,
    columns: PromptColumns | None = None,
    *,
    field: str = "data.path",
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_images: int | None = None,
) -> list[Prompt]:
    """The prompts of `value`, the `field` (`data.path`, `data.eval_path`) naming one file or a
    list of them, read as one prompt set in the listed order (the rules: this module's docstring).
    One file's errors are `read_prompt_file`'s; with several, each starts with `field[i]: `."""
    files = as_paths(value)
    if not files:
        raise ValueError(f"{field}: an empty list; name at least one prompt file")
    labels: list[str | None] = [*file_labels(files)] if len(files) > 1 else [None]  # one file: no label
    out: list[Prompt] = []
    owner: dict[str, int] = {}  # each id's file (its index)
    for i, (file, label) in enumerate(zip(files, labels)):
        try:
            prefix = f"{label}/" if label else ""
            prompts = read_prompt_file(
                file, columns, max_image_bytes=max_image_bytes, max_images=max_images, id_prefix=prefix
            )
        except (OSError, ValueError) as exc:
            if not isinstance(value, list):  # one file named alone: its errors as ever
                raise
            # Of the error's kind as callers catch it (a JSONDecodeError's constructor takes other arguments).
            kind = next(k for k in (FileNotFoundError, OSError, ValueError) if isinstance(exc, k))
            raise kind(f"{field}[{i}]: {exc}") from exc
        if label is None:  # one file: its ids and sources as it has them
            return prompts
        for p in prompts:
            if (j := owner.setdefault(p.prompt_id, i)) != i:
                raise ValueError(
                    f"{field}: prompt_id {p.prompt_id!r} is in both {field}[{j}] ({files[j]}) and {field}[{i}] "
                    f"({file}); ids must be unique across the files (rename them, or drop the prompt_id column "
                    "for positional ids `<file>/row-<n>`)"
                )
        own_source = columns is not None and columns.source is not None
        out += prompts if own_source else [replace(p, source=label) for p in prompts]
    return out
