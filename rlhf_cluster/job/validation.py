"""Checks of user-supplied inputs that run before any work starts.

`validate_model_dir` looks at a Hugging Face model folder without loading it (no torch, no
transformers), so the CLI's `--dry-run` and the driver can reject a wrong `model.path` in
milliseconds instead of failing minutes later inside a worker.
"""

from __future__ import annotations

import json
from pathlib import Path

# Files that carry a tokenizer's vocabulary, next to (or instead of) tokenizer.json.
_VOCAB_PATTERNS = ("vocab.*", "*.model", "*.tiktoken")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class ModelDirError(ValueError):
    """A model folder is not a usable Hugging Face folder; the message names the path and what is missing."""


def _read_json(file: Path, what: str, folder: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"model folder {folder}: {file.name} is not valid JSON ({exc}); expected {what}") from exc
    if not isinstance(data, dict):
        raise ModelDirError(
            f"model folder {folder}: {file.name} must hold a JSON object ({what}), got {type(data).__name__}"
        )
    return data


def _any(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def validate_model_dir(path: str | Path, needs_chat_template: bool = False) -> Path:
    """Check that `path` is a loadable Hugging Face causal-LM folder; return it (user-expanded).

    Raises FileNotFoundError when the folder does not exist and `ModelDirError` (a ValueError)
    when it lacks config.json (or it is not JSON), tokenizer files, weights (or a sharded
    checkpoint misses a shard, or a weight file is empty: a half-finished download or copy),
    or, with `needs_chat_template`, a chat template (`chat_template` in tokenizer_config.json,
    or chat_template.jinja / chat_template.json).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"model folder {folder} does not exist; expected a Hugging Face model folder (config.json, tokenizer, "
            "weights)"
        )
    if not folder.is_dir():
        raise ModelDirError(f"model folder {folder} is not a directory; expected a Hugging Face model folder")

    config = folder / "config.json"
    if not config.is_file():
        raise ModelDirError(
            f"model folder {folder}: no config.json; expected a Hugging Face model folder (save_pretrained output)"
        )
    _read_json(config, "the model's configuration", folder)

    tok_config = _check_tokenizer(folder)
    _check_weights(folder)

    if needs_chat_template and not _has_chat_template(folder, tok_config):
        raise ModelDirError(
            f"model folder {folder}: no chat template; expected `chat_template` in tokenizer_config.json "
            "or a chat_template.jinja file (a base model needs one added before chat-formatted prompts can be used)"
        )
    return folder


def _has_chat_template(folder: Path, tok_config: dict) -> bool:
    """In tokenizer_config.json, or a file of its own beside it."""
    files = ("chat_template.jinja", "chat_template.json")
    return bool(tok_config.get("chat_template")) or any((folder / name).is_file() for name in files)


def _check_tokenizer(folder: Path) -> dict:
    """The folder has a tokenizer's vocabulary; returns its tokenizer_config.json ({} when absent)."""
    tok_config_file = folder / "tokenizer_config.json"
    tok_config = (
        _read_json(tok_config_file, "the tokenizer's configuration", folder) if tok_config_file.is_file() else {}
    )
    if not (folder / "tokenizer.json").is_file() and not _any(folder, _VOCAB_PATTERNS):
        found = " (tokenizer_config.json alone has no vocabulary)" if tok_config_file.is_file() else ""
        raise ModelDirError(
            f"model folder {folder}: no tokenizer files{found}; expected tokenizer.json, or tokenizer_config.json "
            "with its vocabulary (vocab.json + merges.txt, tokenizer.model, vocab.txt, ...)"
        )
    return tok_config


def _check_weights(folder: Path) -> None:
    """The folder has weights, none of them empty, and every shard its index names."""
    index_file = folder / "model.safetensors.index.json"
    if not index_file.is_file():
        index_file = folder / "pytorch_model.bin.index.json"
    if index_file.is_file():
        weight_map = _read_json(index_file, "a sharded checkpoint's weight_map", folder).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirError(f"model folder {folder}: {index_file.name} has no weight_map")
        absent = sorted({shard for shard in weight_map.values() if not (folder / str(shard)).is_file()})
        if absent:
            raise ModelDirError(
                f"model folder {folder}: {index_file.name} names missing shard(s) {absent[:5]} (an incomplete "
                "download?)"
            )
    weights = _any(folder, _WEIGHT_PATTERNS)
    if not weights:
        raise ModelDirError(f"model folder {folder}: no weights; expected *.safetensors or pytorch_model*.bin files")
    empty = [w.name for w in weights if w.stat().st_size == 0]
    if empty:
        raise ModelDirError(
            f"model folder {folder}: weight file(s) {empty[:5]} are empty (an incomplete download or copy?)"
        )


def validate_reward_model_dir(path: str | Path, field: str = "scoring.reward_models") -> Path:
    """A folder written by `rlhf-cluster train-rm`: a model folder plus the scalar head and marker."""
    from rlhf_cluster.models.scalar_head import HEAD_FILE, MARKER_FILE

    folder = Path(path).expanduser()
    try:
        validate_model_dir(folder)
    except (OSError, ModelDirError) as exc:
        raise ModelDirError(f"{field}: {exc}") from exc
    missing = [name for name in (MARKER_FILE, HEAD_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelDirError(
            f"{field}: {folder} has no {', '.join(missing)}; expected a reward model written by `rlhf-cluster train-rm`"
        )
    return folder
