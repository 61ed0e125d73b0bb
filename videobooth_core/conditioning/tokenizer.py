"""The CLIP BPE tokenizer (``transformers.CLIPTokenizer``), loaded offline from a folder with ``vocab.json`` and
``merges.txt``. transformers is imported inside the function, so importing this module is cheap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, explain
from ..files import PathLike

if TYPE_CHECKING:
    import transformers


_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def load_clip_tokenizer(path: PathLike, model_max_length: int | None = 77) -> transformers.CLIPTokenizer:
    """Load a CLIP BPE tokenizer from a folder holding ``vocab.json`` and ``merges.txt``, offline.

    Args:
        path: the folder (or a pipeline root with a ``tokenizer/`` sub-folder); optional ``tokenizer_config.json``
            and ``special_tokens_map.json`` are used when present.
        model_max_length: overrides the stored maximum length (some copies of the CLIP files say 8192, but the
            text encoder has 77 positions). ``None`` keeps the stored value.

    Raises:
        CheckpointError: the folder or its files are missing or unreadable.
    """
    import transformers

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(explain(
            f"tokenizer folder not found (a folder with {' and '.join(_TOKENIZER_FILES)} is expected)", p,
            "pass the CLIP tokenizer folder (e.g. the 'tokenizer' folder of a Stable Diffusion 1.x model)"))
    folder = p
    if not all((p / f).is_file() for f in _TOKENIZER_FILES) and all((p / "tokenizer" / f).is_file()
                                                                   for f in _TOKENIZER_FILES):
        folder = p / "tokenizer"
    missing = [f for f in _TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(explain(
            f"the tokenizer folder lacks {' and '.join(missing)} (a CLIP BPE tokenizer is "
            f"{' + '.join(_TOKENIZER_FILES)}, optionally tokenizer_config.json and special_tokens_map.json)", folder,
            "copy the complete CLIP tokenizer folder"))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(explain(f"cannot load the CLIP tokenizer ({e}; valid vocab.json/merges.txt files are "
                                      "expected)", folder, "copy the tokenizer folder again")) from e
    return tokenizer
