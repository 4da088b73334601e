"""A run's trained policy as a Hugging Face folder: what transformers' `from_pretrained` and
`vllm serve` load (`rlhf-cluster export`).

The run's weight store holds, per version, the policy's tensors under the model folder's names
(an MoE's experts apart, `experts.py`) and nothing else: no config, no tokenizer, and not what the
learner never sends, i.e. a vision-language model's frozen vision tower and an output embedding
tied to the input one. The export is the store version's tensors, every other tensor of the base
model folder (the run's `model.path`, or the tiny model it built in `model.cache_dir`) as that
folder has it (a tied `lm_head` the folder holds is the version's input embedding), and the base
folder's other files (config, generation config, tokenizer, chat template, processor configs).
A version of adapters alone (`learner.lora.sync: adapters`) is refused: it is no whole model.
Tensors keep the dtype the store holds them in (the engines'). The folder is written under a temp
name and renamed into place, one `model.safetensors` up to `SHARD_BYTES`, else shards and their
index; `rlhf_export.json` beside them says which run and version it is, and what came from the base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rlhf_cluster.fileio import CorruptLogError, checksum_file, fsync_path, read_jsonl
from rlhf_cluster.weights.store import WeightIntegrityError, WeightStore

log = logging.getLogger(__name__)

NOTE = "rlhf_export.json"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 4 << 30
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
Source = tuple[Path, str]  # a safetensors file and the tensor's name in it
Blend = Callable[[str, Any], Any]  # (name, tensor read) -> the tensor written


def export_policy(
    run_dir: str | Path, out_dir: str | Path, version: int | None = None, overwrite: bool = False
) -> Path:
    """Write weight `version` of the run in `run_dir` (its newest by default) as a Hugging Face
    folder at `out_dir`; an existing non-empty `out_dir` is refused unless `overwrite`. Returns it."""
    run_dir, out = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    cfg = _recorded_config(run_dir)
    weights = Path(cfg.weights.dir).expanduser() if cfg.weights.dir else run_dir / "weights"  # the run may have moved
    asked = version
    version, store = _chosen_version(weights, version)
    trained = _newest_trained(run_dir)
    if asked is None and trained is not None and trained > version:  # (a stop's version, between persisted ones)
        log.warning(
            f"{run_dir}: the run trained to weight version {trained}, the store's newest is {version} "
            "(weights.persist_every: the versions between live only in the engines); exporting version "
            f"{version}. A resume from the run's checkpoint that trains on writes the versions it reaches."
        )
    base = _base_folder(cfg, run_dir)
    _check_out_dir(out, overwrite, run_dir, inside_none=(base, store.root))
    reader = f"export-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # hosts may share the store
    try:
        store.acquire(version, reader)  # retention keeps it while it is read
    except FileNotFoundError:
        raise ValueError(f"weight store {store.root}: version {version} was pruned while being exported") from None
    try:
        sources, from_base = version_sources(store, version, base)
        note = {
            "run_dir": str(run_dir.resolve()),
            "version": version,
            "created_at": store.manifest(version).get("created_at"),
            "base_model": str(base),
            "from_base": from_base,
        }
        write_folder(out, base, sources, note, overwrite)
    finally:
        store.release(version, reader)
        store.close()
    return out


def exported_version(folder: str | Path) -> int:
    """The weight version an exported folder holds (its `rlhf_export.json`)."""
    return int(json.loads((Path(folder) / NOTE).read_text())["version"])


def reference_version_of(folder: str | Path) -> int:
    """The weight version a model folder holds: an export's or a refreshed reference's, else 0 (a model folder)."""
    return exported_version(folder) if (Path(folder) / NOTE).is_file() else 0


def _recorded_config(run_dir: Path):
    from rlhf_cluster.config import load_config
    from rlhf_cluster.run.run_dir import RunDir

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    path = run_dir / RunDir.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} the run directory of a job that started?)")
    return load_config(path)


def _chosen_version(root: Path, version: int | None) -> tuple[int, WeightStore]:
    """`version`, or the newest, of those the store at `root` holds (one it does not hold is
    refused naming them), and the store."""
    store = WeightStore(root) if root.is_dir() else None
    held = store.versions() if store is not None else []
    if store is None or not held:
        raise FileNotFoundError(f"weight store {root} holds no weight version (did the run publish one?)")
    if version is None:
        latest = store.latest_version()
        return (latest if latest in held else held[-1]), store
    if version not in held:
        if version == 0:
            why = "version 0 is the base model (model.path, or the built-in one), not a trained version"
        elif version > held[-1]:
            why = "newer than its newest: only some versions are written to it (weights.persist_every, checkpoints')"
        else:
            why = "older ones are pruned (weights.keep), and between them only some are written (weights.persist_every)"
        raise ValueError(f"--version {version}: weight store {root} holds versions {', '.join(map(str, held))}: {why}")
    return version, store


def _newest_trained(run_dir: Path) -> int | None:
    """The weight version of the run's last trained step (metrics.jsonl), None when it has none."""
    try:
        rows = read_jsonl(run_dir / "metrics.jsonl").rows  # (a torn last line left out)
    except CorruptLogError:
        return None  # the export's own figures do not depend on it
    return max((int(r["weight_version"]) for r in rows if "weight_version" in r), default=None)


def _base_folder(cfg, run_dir: Path) -> Path:
    """The model folder the run started from: `model.path`, or its tiny model (rebuilt, the same, if gone)."""
    if cfg.model.path is None:
        from rlhf_cluster.models.tiny_model import ensure_tiny_model

        return ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir)
    base = Path(cfg.model.path).expanduser()
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {cfg.model.path} (in {run_dir}/config.yaml): no config.json there; the base model "
            "folder supplies the export's config, tokenizer and the tensors the store leaves out"
        )
    return base


def _check_out_dir(out: Path, overwrite: bool, run_dir: Path, inside_none: tuple[Path, ...]) -> None:
    """`out` neither is nor holds the run directory, and is not inside its weight store or the base
    model folder; `--overwrite` replaces only an earlier export (it holds `rlhf_export.json`), never
    another folder's files."""
    where = out.resolve()
    holds = any(p.resolve().is_relative_to(where) for p in (run_dir, *inside_none))
    if holds or any(where.is_relative_to(p.resolve()) for p in inside_none):
        raise ValueError(f"--out {out}: is or holds the run directory, or lies in its weight store or the base model")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out}: is not empty (--overwrite replaces an earlier export there)")
        if not (out / NOTE).is_file():
            raise ValueError(f"--out {out}: holds files but no earlier export ({NOTE}); --overwrite replaces only that")


def folder_weights(base: Path) -> dict[str, Path]:
    """Each tensor of the base folder's safetensors and the file holding it."""
    from safetensors import safe_open

    index = base / INDEX
    if index.is_file():
        return {name: base / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    if not out:
        raise FileNotFoundError(f"base model folder {base}: no safetensors weights (an export takes them from there)")
    return out


def version_sources(store: WeightStore, version: int, base: Path) -> tuple[dict[str, Source], list[str]]:
    """Where each tensor of the export comes from (the version's shards, checked against their
    manifest, or the base folder), and the names taken from the base."""
    manifest, directory = store.manifest(version), store.version_dir(version)
    stored: dict[str, dict] = manifest["tensors"]
    if any(name.startswith("base_model.model.") or ".lora_A." in name for name in stored):
        raise ValueError(
            f"weight store {store.root}: version {version} holds LoRA adapters alone (learner.lora.sync: "
            "adapters), not a whole model; export a run trained with learner.lora.sync: merged"
        )
    in_base = folder_weights(base)
    foreign = sorted(set(stored) - set(in_base))
    if foreign:
        raise ValueError(
            f"weight store {store.root}: version {version} holds {len(foreign)} tensor(s) the base model folder "
            f"{base} does not (first: {foreign[0]}): is model.path the folder the run trained?"
        )
    if manifest.get("checksum") != "blake3":
        raise WeightIntegrityError(f"version {version}: written by an older build (sha256 checksums)")
    for shard, digest in manifest["shards"].items():
        if not (directory / shard).is_file() or checksum_file(directory / shard) != digest:
            raise WeightIntegrityError(f"version {version}: shard {shard} is missing or does not match the manifest")
    sources: dict[str, Source] = {name: (file, name) for name, file in in_base.items()}
    sources.update({name: (directory / meta["shard"], name) for name, meta in stored.items()})
    embed = [name for name in stored if name.endswith("embed_tokens.weight")]
    if "lm_head.weight" in in_base and "lm_head.weight" not in stored and len(embed) == 1 and _tied(base):
        sources["lm_head.weight"] = sources[embed[0]]  # the trained input embedding, as the folder names it
    return sources, sorted(name for name, (file, _) in sources.items() if not file.is_relative_to(directory))


def _tied(base: Path) -> bool:
    """Whether the base model ties its output embedding to the input one (transformers' default: yes)."""
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def write_folder(
    out: Path, base: Path, sources: dict[str, Source], note: dict, overwrite: bool, blend: Blend | None = None
) -> None:
    """The folder written under a temp name beside `out`, then renamed into place (an earlier
    `out` moved aside first and deleted once the new one is there). `blend(name, tensor)`: what
    is written for each tensor read (default: the tensor)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep a server run as another user out
    try:
        for file in sorted(base.iterdir()):
            if file.is_file() and not file.name.endswith(WEIGHT_FILES):
                shutil.copy2(file, tmp / file.name)
        _write_tensors(tmp, sources, blend)
        (tmp / NOTE).write_text(json.dumps(note, indent=1))
        for written in tmp.glob("*.safetensors*"):  # safetensors writes 0600: readable as the base's files are
            written.chmod(0o666 & ~umask)
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
        aside = None
        if out.is_dir() and any(out.iterdir()) and overwrite:
            aside = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(aside)
        elif out.is_dir():
            out.rmdir()
        tmp.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_tensors(folder: Path, sources: dict[str, Source], blend: Blend | None = None) -> None:
    """Every tensor of `sources` read one at a time (through `blend`, if given) into shards of up
    to `SHARD_BYTES`: one `model.safetensors`, or `model-0000i-of-0000n.safetensors` and their index."""
    from safetensors import safe_open

    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = total = 0
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        read: set[Source] = set()
        for name in sorted(sources):
            file, key = sources[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), "pt"))
            tensor = handles[file].get_tensor(key)
            if (file, key) in read:  # a tied tensor read twice shares its memory, which safetensors refuses
                tensor = tensor.clone()
            read.add((file, key))
            if blend is not None:
                tensor = blend(name, tensor)
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > SHARD_BYTES:
                shards.append(_save(folder, len(shards), current))
                current, size = {}, 0
            current[name], size, total = tensor, size + nbytes, total + nbytes
        shards.append(_save(folder, len(shards), current))
    if len(shards) == 1:
        (folder / shards[0]["file"]).rename(folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / shard["file"]).rename(folder / name)
        weight_map.update(dict.fromkeys(shard["names"], name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=1))


def _save(folder: Path, number: int, tensors: dict[str, Any]) -> dict[str, Any]:
    import safetensors.torch

    file = f".shard-{number}.safetensors"
    safetensors.torch.save_file(tensors, str(folder / file), metadata={"format": "pt"})
    return {"file": file, "names": list(tensors)}
