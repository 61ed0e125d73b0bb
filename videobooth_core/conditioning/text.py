"""Prompt handling and subject-token replacement (the coarse image-prompt embedding).

As the official pipeline does, the prompt is lower-cased and the subject word replaced by the placeholder
``sdksd`` (3 CLIP BPE tokens); the placeholder's token embeddings are then replaced by the mapper's 5
word vectors *before* position embeddings, the rest of the sequence shifting right (truncated at 77).
The trained weights expect exactly this sequence, including the positions of every later token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PromptError, explain
from ..models.config import NUM_MAPPER_LEVELS

PLACEHOLDER_WORD = "sdksd"
NULL_PROMPT = "None"
"""The official unconditional prompt is the literal string "None", not the empty string."""
MAX_TOKENS = 77
WHOLE_WORD = "whole-word"
OFFICIAL_SUBSTRING = "official-substring"
SUBJECT_MATCHES = (WHOLE_WORD, OFFICIAL_SUBSTRING)
"""How the subject word is found in the prompt (see :func:`substitute_subject`)."""
DROPPED_WORDS_SHOWN = 20


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt ready for encoding: ``input_ids`` (1, 77) int64 and the placeholder's token ids."""

    text: str
    """The prompt as tokenised (lower-cased, subject word replaced by the placeholder)."""
    input_ids: torch.Tensor
    placeholder_ids: tuple[int, ...]


def substitute_subject(prompt: str, subject_word: str, match: str = WHOLE_WORD) -> str:
    """Lower-case ``prompt`` and replace the subject word by the placeholder wherever it occurs.

    ``match="whole-word"`` (default) replaces whole words only: with the word "dog", "a dog's hotdog" becomes
    "a sdksd's hotdog". ``match="official-substring"`` is the official code's plain substring replacement
    ("hotdog" becomes "hotsdksd", "pandas" becomes "sdksds"). Several words ("teddy bear") match across any
    whitespace. Raises PromptError if the word is empty or not in the prompt (listing the prompt's words).
    """
    if not isinstance(subject_word, str) or not isinstance(prompt, str):
        raise PromptError(f"the prompt and the subject word must be strings, got {prompt!r} and {subject_word!r}")
    if match not in SUBJECT_MATCHES:
        raise PromptError(f"unknown subject_match {match!r}; choose one of {', '.join(SUBJECT_MATCHES)}")
    word = subject_word.strip().lower()
    if not word:
        raise PromptError("the subject word is empty; give the word of the prompt that names the subject, e.g. 'dog'")
    lowered = prompt.lower()
    if match == OFFICIAL_SUBSTRING:
        text, count = lowered.replace(word, PLACEHOLDER_WORD), lowered.count(word)
    else:
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in word.split()) + r"(?!\w)"
        text, count = re.subn(pattern, PLACEHOLDER_WORD, lowered)
    if not count:
        words = re.findall(r"[\w'-]+", lowered)
        inside = [w for w in dict.fromkeys(words) if word in w]
        hint = (f" (it only appears inside {', '.join(repr(w) for w in inside)}: the subject word must be a whole "
                f"word; subject_match='{OFFICIAL_SUBSTRING}' replaces inside words as the official code did)"
                if inside else "")
        raise PromptError(
            f"the subject word {subject_word!r} is not in the prompt {prompt!r}{hint}; "
            f"use one of the prompt's words: {', '.join(repr(w) for w in dict.fromkeys(words)) or '(none)'}"
        )
    return text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """CLIP token ids padded with end-of-text to 77 and truncated: (1, 77) int64."""
    ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    return ids.to(torch.long)


def placeholder_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The token ids of the placeholder word (3 with CLIP's vocabulary: "sd", "k", "sd</w>")."""
    return tuple(int(i) for i in tokenizer(PLACEHOLDER_WORD, add_special_tokens=False).input_ids)


def prepare_subject_prompt(tokenizer: Any, prompt: str, subject_word: str, match: str = WHOLE_WORD,
                           vectors: int = NUM_MAPPER_LEVELS) -> SubjectPrompt:
    """Substitute the placeholder and tokenise; PromptError if any of the ``vectors`` word vectors that replace
    the placeholder would fall past CLIP's 77 tokens (see :func:`prompt_fit`)."""
    text = substitute_subject(prompt, subject_word, match)
    placeholder = placeholder_token_ids(tokenizer)
    prompt_fit(tokenizer, text, placeholder, vectors, subject_word)  # raises when the subject's vectors are cut
    return SubjectPrompt(text=text, input_ids=tokenize(tokenizer, text), placeholder_ids=placeholder)


def prompt_fit(tokenizer: Any, text: str, placeholder_ids: tuple[int, ...] = (), vectors: int = NUM_MAPPER_LEVELS,
               subject_word: str | None = None) -> list[str]:
    """The words of ``text`` (already substituted) that never reach the text encoder: cut by the tokenizer's
    77-token limit or pushed out by the subject splice (each placeholder's tokens become ``vectors`` vectors,
    shifting the rest right, as :func:`splice_subject_embeddings` does). The end-of-text token is not a word.

    Raises PromptError when a splice would be cut: every position holding the placeholder's first token
    starts a splice (the official rule), so each such position must leave room for all ``vectors`` vectors.
    """
    full = [int(i) for i in tokenizer(text, verbose=False).input_ids]  # start, tokens, end; verbose: no length warning
    starts = [i for i, token in enumerate(full) if placeholder_ids and token == placeholder_ids[0]]
    late = [i for i in starts if i + vectors > MAX_TOKENS]
    if late:
        raise PromptError(
            f"the subject word {subject_word!r} lies beyond CLIP's {MAX_TOKENS}-token limit after the subject splice: "
            f"its {vectors} word vectors would start at token {late[0]}, and only tokens up to {MAX_TOKENS - vectors} "
            f"leave room for them ({len(full)} tokens in all); shorten the prompt or mention the subject earlier"
        )
    # follow every position through the tokenizer's truncation and the splice itself
    ids = tokenize(tokenizer, text)
    positions = torch.arange(MAX_TOKENS, dtype=torch.float64).view(1, MAX_TOKENS, 1)
    if starts:
        positions = splice_subject_embeddings(positions, ids, placeholder_ids,
                                              torch.full((1, vectors, 1), -1.0, dtype=torch.float64))
    kept = {int(p) for p in positions.flatten().tolist() if p >= 0}
    replaced = {i for s in starts for i in range(s, s + len(placeholder_ids))}
    lost = {i for i in range(1, len(full) - 1) if i not in kept and i not in replaced}
    if not lost:
        return []
    return dropped_words(tokenizer, full, lost)


def dropped_words(tokenizer: Any, full: Sequence[int], lost: set[int]) -> list[str]:
    """The words of the token ids ``full`` (start and end tokens included) that have a token at a position in
    ``lost`` (a word ends with the token marked ``</w>``)."""
    tokens = tokenizer.convert_ids_to_tokens(list(full[1:-1]))
    dropped, word, word_lost = [], [], False
    for position, token in enumerate(tokens, start=1):
        word.append(full[position])
        word_lost |= position in lost
        if token.endswith("</w>") or position == len(tokens):
            if word_lost:
                dropped.append(tokenizer.decode(word).strip())
            word, word_lost = [], False
    return dropped


def prompt_fit_warnings(tokenizer: Any, prompt: str, subject_word: str | None = None, match: str = WHOLE_WORD,
                        vectors: int = NUM_MAPPER_LEVELS, what: str = "prompt") -> list[str]:
    """A warning naming the words of ``prompt`` that CLIP never sees (empty list when it all fits); PromptError
    when the subject's vectors would be cut (see :func:`prompt_fit`)."""
    if subject_word is None:
        dropped = prompt_fit(tokenizer, prompt)
    else:
        text = substitute_subject(prompt, subject_word, match)
        dropped = prompt_fit(tokenizer, text, placeholder_token_ids(tokenizer), vectors, subject_word)
    if not dropped:
        return []
    shown = " ".join(dropped[:DROPPED_WORDS_SHOWN]) + (" ..." if len(dropped) > DROPPED_WORDS_SHOWN else "")
    splice = " after the subject splice" if subject_word is not None else ""
    return [f"the {what} does not fit CLIP's {MAX_TOKENS} tokens{splice}: {len(dropped)} word(s) are dropped: "
            f"'{shown}'; shorten the {what} to keep them"]


def splice_subject_embeddings(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_ids: tuple[int, ...], injected: torch.Tensor
) -> torch.Tensor:
    """Replace the placeholder's token embeddings by the injected word vectors.

    Args:
        token_embeds: (b, 77, d) token embeddings (before position embeddings).
        input_ids: (b, 77) token ids; every position holding ``placeholder_ids[0]`` starts a splice.
        placeholder_ids: the n token ids of the placeholder word.
        injected: (b, k, d) word vectors from the mapper.

    Returns:
        (b, 77, d): prefix, the k vectors, then the tokens after the placeholder (shifted by k - n and
        truncated to 77; when n > k the sequence is refilled from its own end), exactly as the official code.
    """
    total = token_embeds.shape[1]
    n, k = len(placeholder_ids), injected.shape[1]
    out = token_embeds.clone()
    for b in range(token_embeds.shape[0]):
        for start in torch.nonzero(input_ids[b] == placeholder_ids[0]).flatten().tolist():
            end = start + n - 1
            if start + k < total:
                if n <= k:
                    out[b, start + k:] = token_embeds[b, end + 1: end + 1 + total - start - k]
                else:
                    out[b, start + k:] = torch.cat([token_embeds[b, end + 1:], token_embeds[b, total - (n - k):]])
            written = min(k, total - start)
            out[b, start: start + written] = injected[b, :written].to(out.dtype)
    return out


def spliced_positions(input_ids: torch.Tensor, placeholder_ids: tuple[int, ...], vectors: int) -> list[int]:
    """Where each of the 77 positions of the spliced sequence comes from, by :func:`splice_subject_embeddings` itself:
    ``p >= 0`` the token at position ``p`` of ``input_ids``, ``-(j + 1)`` the mapper's word vector ``j``.

    For hosts that splice by handing their own text encoder a token list with embedding tensors in it (ComfyUI's
    tokenizer output, as textual inversion does): the list built from these positions encodes to exactly the
    core's splice, repeated placeholders and truncation included.

    Args:
        input_ids: (77,) or (1, 77) token ids of the substituted prompt.
    """
    ids = input_ids.reshape(1, -1)
    positions = torch.arange(ids.shape[1], dtype=torch.float64).view(1, -1, 1)
    markers = -torch.arange(1, vectors + 1, dtype=torch.float64).view(1, vectors, 1)
    spliced = splice_subject_embeddings(positions, ids, placeholder_ids, markers)
    return [int(p) for p in spliced.flatten().tolist()]


@dataclass
class TextEncoding:
    """Text states and the intermediates the parity tests check."""

    last_hidden_state: torch.Tensor
    """(b, 77, d) after the final layer norm: the UNet's text context."""
    inputs_embeds: torch.Tensor
    """(b, 77, d) token embeddings after the splice, before position embeddings."""
    embeddings: torch.Tensor
    """(b, 77, d) with position embeddings (input of the first layer)."""


def encode_text(
    text_model: Any,
    input_ids: torch.Tensor,
    injected: torch.Tensor | None = None,
    placeholder_ids: tuple[int, ...] | None = None,
    splice: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TextEncoding:
    """Encode token ids with a transformers ``CLIPTextModel``, splicing ``injected`` over the placeholder.

    Args:
        text_model: ``transformers.CLIPTextModel`` (4.x or 5.x layout).
        input_ids: (b, 77) int64.
        injected: (b, k, d) mapper word vectors, or None for a plain encoding.
        placeholder_ids: the placeholder's token ids (required with ``injected``).
        splice: instead of ``injected``, ``(token_embeds, input_ids) -> token_embeds``: several subjects' vectors
            (:func:`..conditioning.subjects.splice_subjects`).

    Returns:
        :class:`TextEncoding`; a causal mask and no padding mask, final layer norm, no clip-skip.
    """
    transformer = getattr(text_model, "text_model", text_model)
    param = transformer.embeddings.token_embedding.weight
    input_ids = input_ids.to(param.device)
    tokens = transformer.embeddings.token_embedding(input_ids)
    if splice is not None:
        tokens = splice(tokens, input_ids)
    elif injected is not None:
        if placeholder_ids is None:
            raise PromptError(explain("placeholder_ids are required with injected word vectors", placeholder_ids,
                                      "pass the placeholder_ids of prepare_subject_prompt(...)"))
        tokens = splice_subject_embeddings(tokens, input_ids, placeholder_ids, injected.to(param.device))
    length = input_ids.shape[1]
    positions = torch.arange(length, device=param.device)[None]
    hidden = tokens + transformer.embeddings.position_embedding(positions)
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=param.device, dtype=hidden.dtype)
    causal = torch.triu(causal, diagonal=1)[None, None].expand(input_ids.shape[0], 1, length, length)
    encoded = transformer.encoder(inputs_embeds=hidden, attention_mask=causal)
    encoded = encoded[0] if isinstance(encoded, tuple) else encoded.last_hidden_state
    return TextEncoding(transformer.final_layer_norm(encoded), tokens, hidden)
