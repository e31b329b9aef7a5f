"""Running models with transformers (imported lazily, only here): quiet loading of a float32
causal LM and its tokenizer, and text cut into batches of token ids."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loramerge.errors import FormatError


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars, advice or deprecation warnings from transformers / PEFT on stderr while
    models load and run: the command's result is the output. Settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(folder: Path):
    """The model as a float32 transformers causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, local_files_only=True
            )
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(
            f"transformers cannot load it as a causal language model ({exc})", file=folder
        ) from None
    return model.eval()


def text_batches(
    folder: Path, text: Path, seq_len: int, batch_size: int, max_batches: int | None
) -> list[torch.Tensor]:
    """The text tokenised by the base's tokenizer, cut into sequences of seq_len (at least 2),
    batch_size (at least 1) to a batch, at most max_batches batches."""
    from transformers import AutoTokenizer

    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot be read as UTF-8 text ({exc})", file=text) from None
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(
            f"has no tokenizer transformers can load ({exc})",
            file=folder,
            hint="the text needs the base's tokenizer files",
        ) from None
    with quiet_transformers():  # the whole text is longer than one sequence: no warning
        ids = tokenizer(content)["input_ids"]
    if len(ids) < 2:
        raise FormatError("holds fewer than 2 tokens", file=text)
    length = min(seq_len, len(ids))
    count = len(ids) // length
    chunks = torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)
    batches = list(chunks.split(batch_size))
    return batches[:max_batches] if max_batches is not None else batches
