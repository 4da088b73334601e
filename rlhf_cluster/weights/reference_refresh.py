"""Reference refresh (`algorithm.kl.reference_refresh`): every `every_steps` steps the KL term's
reference moves to the policy: to it (`mix: 1`, ProRL's reference reset) or part way
(`ref <- mix * policy + (1 - mix) * ref`, TR-DPO's mixing as TRL's `sync_ref_model` does it).

A refreshed reference is a model folder, written once from a stored weight version and the
reference before it, under the run directory:

    reference/v00000020/    the reference from weight version 20 on (a Hugging Face folder)

so a replaced reference worker, a resumed job and a rolled-back one all load the one their
version calls for (`reference_version`): the refresh at or before it, the model the job started
from before the first. A folder is written as an export is (`export.py`: a temp name, renamed
into place), so a folder that exists is complete. Folders of versions a rollback abandoned are
removed (`discard_after`); the others go once neither a kept checkpoint nor the pool can need them (`prune`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rlhf_cluster.weights.export import folder_weights, version_sources, write_folder
from rlhf_cluster.weights.store import WeightStore

FOLDER = "v{:08d}"


def reference_version(version: int, every: int) -> int:
    """The weight version the reference of policy `version` comes from: the newest refresh at or
    before it (0: none yet, the model the job started from)."""
    return version // every * every


def folder_of(root: Path, version: int) -> Path:
    """Where the reference refreshed at `version` is written."""
    return root / FOLDER.format(version)


def written(root: Path) -> dict[int, Path]:
    """The refreshed references under `root`, by version (complete ones: temp names are not read)."""
    if not root.is_dir():
        return {}
    out = {}
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("v") and path.name[1:].isdigit():
            out[int(path.name[1:])] = path
    return dict(sorted(out.items()))


def reference_folder(root: Path, base: str | Path, version: int, every: int) -> Path:
    """The folder the reference of policy `version` loads: its refresh's, or `base` before the
    first. A refresh that should be there and is not (removed by hand) is an error naming it."""
    source = reference_version(version, every)
    if source == 0:
        return Path(base)
    folder = folder_of(root, source)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: the reference refreshed at weight version {source} (algorithm.kl.reference_refresh) is "
            f"missing; weight version {version} needs it"
        )
    return folder


def write_reference(store: WeightStore, version: int, base: Path, previous: Path, mix: float, out: Path) -> Path:
    """Write the reference refreshed at `version` to `out`: the store's `version`, mixed with the
    reference before it (`previous`: a refresh's folder, or `base`) as `mix * policy + (1 - mix) *
    previous` (computed and kept in float32, so a small move is not rounded away in bf16) for every
    tensor the policy trains (`mix: 1`: the stored tensors as they are);
    every other tensor, the config and the tokenizer as `base` has them. Reads under a lease."""
    reader = f"reference-refresh-{version}"
    try:
        store.acquire(version, reader)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"weight store {store.root}: version {version} is gone before the reference refresh read it "
            "(raise weights.keep)"
        ) from None
    try:
        sources, from_base = version_sources(store, version, base)
        trained = set(sources) - set(from_base)
        blend = None if mix == 1.0 else _mixer(folder_weights(previous), trained, mix)
        note = {"version": version, "mix": mix, "previous": str(previous), "base_model": str(base)}
        write_folder(out, base, sources, note, overwrite=False, blend=blend)
    finally:
        store.release(version, reader)
    return out


def _mixer(previous: dict[str, Path], trained: set[str], mix: float):
    """`blend` for `write_folder`: a trained tensor mixed with the previous reference's."""
    from safetensors import safe_open

    def blend(name: str, tensor: Any) -> Any:
        if name not in trained:
            return tensor
        if name not in previous:
            raise ValueError(f"reference refresh: the previous reference has no tensor {name}")
        with safe_open(str(previous[name]), "pt") as f:
            before = f.get_tensor(name)
        if before.shape != tensor.shape:
            raise ValueError(
                f"reference refresh: {name} is {tuple(tensor.shape)}, the previous reference's {tuple(before.shape)}"
            )
        return mix * tensor.float() + (1.0 - mix) * before.float()  # float32: bf16 would round small moves away

    return blend


def discard_after(root: Path, version: int) -> list[int]:
    """Remove the references refreshed after `version` (a rollback or resume abandoned them) and
    the temp folders of writes a kill cut short (call it with no write running); the removed versions."""
    gone = [v for v in written(root) if v > version]
    for v in gone:
        shutil.rmtree(folder_of(root, v), ignore_errors=True)
    for partial in root.glob(".v*") if root.is_dir() else ():  # a write a kill cut short (none runs now)
        shutil.rmtree(partial, ignore_errors=True)
    return gone


def prune(root: Path, every: int, versions: list[int]) -> list[int]:
    """Remove every reference no policy version of `versions` loads (the kept checkpoints', the
    current one's, the one before it and those a starting worker may still read); the removed versions."""
    keep = {reference_version(v, every) for v in versions}
    gone = [v for v in written(root) if v not in keep]
    for v in gone:
        shutil.rmtree(folder_of(root, v), ignore_errors=True)
    return gone
