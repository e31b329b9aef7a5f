"""Where an input is: a local path, or a Hugging Face hub repo id (`org/name`) looked up in the
huggingface-hub cache first and downloaded only when it is not there."""

from __future__ import annotations

import re
from pathlib import Path

from loramerge.errors import LoramergeError, UnknownFormatError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What loramerge reads from a base model repository: config, safetensors weights, tokenizer
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
# ... and from an adapter or checkpoint repository, whose weights may also be pickled or GGUF
ADAPTER_FILES = ("*.json", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


def resolve(ref: str | Path, what: str, files: tuple[str, ...] = ADAPTER_FILES) -> Path:
    """`ref` itself when it exists, else the snapshot folder of the hub repo it names, with the
    `files` loramerge reads from it.

    `what` says what is looked for ("adapter", "base model", ...) for the error messages.
    """
    path = Path(ref)
    if path.exists() or path.is_symlink():
        return path
    text = str(ref)
    if not is_repo_id(text):
        raise UnknownFormatError(
            "does not exist", file=path, hint=f"pass a local {what} or a hub repo id"
        )
    from huggingface_hub import snapshot_download

    patterns = list(files)
    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:
        raise LoramergeError(
            f"does not exist here and is not a cached or reachable hub repo ({type(exc).__name__})",
            file=text,
            hint=f"download the {what} first (`hf download {text}`) or pass a local path",
        ) from None
