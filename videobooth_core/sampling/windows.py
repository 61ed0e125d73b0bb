"""Long videos by sliding context windows: the frames are split into overlapping windows the model's size, every
step runs the guided denoiser on each window and fuses their predictions, so memory stays that of one window and
time grows linearly with the frames.

Why every window starts with the *global* frame 0. VideoBooth's cross-frame attention makes every frame attend to
[frame 0 ; previous frame], and the image prompt enters through frame 0's values. A window that is
``[frame 0] + (window - 1) consecutive frames`` therefore attends, at every frame, to the same frame 0 and the
same image prompt as the first window: the subject is held across the whole video. Frame 0's prediction is taken
from the first window alone (the later windows only attend to it).

    windows = context_windows(frames=40, window=16, overlap=4)   # [[0..15], [0, 12..26], [0, 23..37], [0, 25..39]]
    weights = fuse_weights(windows, 40, "pyramid")              # per window, per frame; they sum to 1 at each frame
    denoiser = WindowedDenoiser(inner, ContextOptions(window=16, overlap=4))

The image-prompt stream runs on the window's frame count, once per step: its features (frame 0's per-site
``attn1`` inputs) are the same for every window, so they are captured once and shared. With frames <= window the
windowed denoiser is the inner one, bit for bit.

The second schedule, ``contiguous`` (VideoCrafter1/2: temporal convolutions and relative positions need neighbouring
frames side by side), is the AnimateDiff-style uniform one: windows of ``window`` consecutive frames, ``overlap``
shared by neighbours, the last aligned to the video's end; the same fuse modes and weights, without the frame-0 rule:

    context_windows(40, 16, 4, CONTIGUOUS)   # [[0..15], [12..27], [24..39]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SamplingError, explain
from ..settings import CONTEXT_OVERLAP, CONTEXT_WINDOW, FUSE_MODES, flag_names

FRAME0 = "frame0"
"""VideoBooth's schedule: every window is the global frame 0 plus consecutive frames."""
CONTIGUOUS = "contiguous"
"""VideoCrafter's schedule: every window is consecutive frames only."""
SCHEDULES: tuple[str, ...] = (FRAME0, CONTIGUOUS)


@dataclass(frozen=True)
class ContextOptions:
    """How a long video is split: ``window`` frames per UNet call (frame 0 included), ``overlap`` frames shared
    by neighbouring windows (besides frame 0), ``fuse`` the weights of overlapping predictions (``pyramid``:
    highest at a window's middle, so seams fade; ``flat``: equal), ``noise_reuse``: FreeNoise-style initial
    noise (later windows start from shuffled copies of earlier windows' noise, which keeps the content closer).
    ``schedule``: :data:`FRAME0` (VideoBooth) or :data:`CONTIGUOUS` (VideoCrafter: windows of consecutive frames,
    no frame 0, so ``overlap`` counts every shared frame)."""

    window: int = CONTEXT_WINDOW
    overlap: int = CONTEXT_OVERLAP
    fuse: str = FUSE_MODES[0]
    noise_reuse: bool = False
    schedule: str = FRAME0

    def __post_init__(self) -> None:
        check_context(self.window, self.overlap, self.fuse, schedule=self.schedule)
        if self.noise_reuse and self.schedule != FRAME0:  # reuse_noise's shuffle is laid out for frame-0 windows
            raise SamplingError(explain("noise reuse (FreeNoise) works with the frame-0 windows only; the schedule is",
                                        self.schedule, "leave noise reuse off"))

    def applies(self, frames: int) -> bool:
        """True when a video of ``frames`` frames is denoised by windows (more frames than one window)."""
        return frames > self.window


def check_context(window: int, overlap: int, fuse: str = FUSE_MODES[0],
                  names: Callable[[str], str] = flag_names, *, schedule: str = FRAME0) -> None:
    """SamplingError naming the value and the fix unless the window, overlap and fuse mode work together
    (``names``: how the caller's road names ``context_window`` and ``context_overlap``; the flags by default).
    Each window needs at least one frame its predecessor lacks: ``overlap`` at most ``window - 2`` with
    :data:`FRAME0` (frame 0 is in every window), ``window - 1`` with :data:`CONTIGUOUS`."""
    if schedule not in SCHEDULES:
        raise SamplingError(explain("unknown context window schedule", schedule,
                                    f"choose one of {', '.join(SCHEDULES)}"))
    shared = 1 if schedule == FRAME0 else 0  # frames every window holds besides its overlap: frame 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise SamplingError(explain("the context window must be a whole number of at least 2 frames", window,
                                    f"use {names('context_window')} {CONTEXT_WINDOW} (the trained length)"))
    suggested = max(0, min(CONTEXT_OVERLAP, window - 1 - shared))
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise SamplingError(explain("the context overlap must be a whole number of frames, at least 0", overlap,
                                    f"use {names('context_overlap')} {suggested}"))
    if overlap > window - 1 - shared:
        why = ("frame 0 is in every window, so each window needs at least one new frame" if shared else
               "each window needs at least one new frame")
        raise SamplingError(explain(
            f"{names('context_overlap')} must be at most {names('context_window')} - {1 + shared} = "
            f"{window - 1 - shared} ({why})", overlap,
            f"lower {names('context_overlap')} to {suggested} or raise {names('context_window')} to "
            f"{overlap + 1 + shared} or more"))
    if fuse not in FUSE_MODES:
        raise SamplingError(explain("unknown context fuse mode", fuse, f"choose one of {', '.join(FUSE_MODES)}"))


def context_windows(frames: int, window: int, overlap: int, schedule: str = FRAME0) -> list[list[int]]:
    """The frame indices of every window. :data:`FRAME0`: the first is ``[0, window)``; each later one is frame 0
    followed by ``window - 1`` consecutive frames, starting ``window - 1 - overlap`` after the previous one.
    :data:`CONTIGUOUS`: ``window`` consecutive frames each, starting ``window - overlap`` after the previous one
    at frame 0. Either way the last window is aligned to the video's end (it overlaps its neighbour more), and
    with ``frames <= window`` there is one window of all the frames.

    Returns:
        a list of windows, each a list of ascending frame indices (length ``min(frames, window)``).
    """
    check_context(window, overlap, schedule=schedule)
    if frames < 1:
        raise SamplingError(explain("a video needs at least one frame", frames, "use --frames 1 or more"))
    if frames <= window:
        return [list(range(frames))]
    head = [0] if schedule == FRAME0 else []  # the frames every window holds
    first = len(head)  # where the consecutive part of the first window starts
    span = window - first  # the consecutive frames of a window
    stride = span - overlap
    starts = list(range(first, frames - span + 1, stride))
    if starts[-1] != frames - span:  # the last window ends at the last frame
        starts.append(frames - span)
    return [[*head, *range(start, start + span)] for start in starts]


def fuse_weights(windows: list[list[int]], frames: int, fuse: str = FUSE_MODES[0],
                 schedule: str = FRAME0) -> list[torch.Tensor]:
    """Per window, the float32 weight of its prediction at each of its frames; at every frame the weights of the
    windows covering it sum to 1 (normalised in float64). :data:`FRAME0`: frame 0 weighs 1 in the first window and
    0 elsewhere.

    ``pyramid``: a frame's raw weight is its distance to the nearer end of its window's consecutive part (plus
    one), so predictions made near a window's edge (where the neighbour's context is missing) count less.
    """
    if fuse not in FUSE_MODES:
        raise SamplingError(explain("unknown context fuse mode", fuse, f"choose one of {', '.join(FUSE_MODES)}"))
    head = 1 if schedule == FRAME0 else 0  # frame 0, before the consecutive part
    raw = []
    for number, window in enumerate(windows):
        span = len(window) - head
        if fuse == "flat" or span < 1:
            weights = [1.0] * len(window)
        else:
            weights = [1.0] * head + [float(min(i + 1, span - i)) for i in range(span)]
        if head and number > 0:
            weights[0] = 0.0  # frame 0 is predicted by the first window; later windows only attend to it
        raw.append(torch.tensor(weights, dtype=torch.float64))
    total = torch.zeros(frames, dtype=torch.float64)
    for window, weights in zip(windows, raw):
        total[window] += weights
    if bool((total <= 0).any()):
        missing = int(torch.nonzero(total <= 0)[0])
        raise SamplingError(explain("the context windows leave a frame uncovered", missing,
                                    "this is a bug in the window schedule; please report it"))
    return [(weights / total[window]).float() for window, weights in zip(windows, raw)]


def reuse_noise(noise: torch.Tensor, options: ContextOptions, generator: torch.Generator) -> torch.Tensor:
    """FreeNoise-style initial noise: each chunk of ``window - 1 - overlap`` frames after the first window is a
    shuffled copy of the frames ``window - 1`` before it, so every window starts from (nearly) the same frames of
    noise in another order. Frame 0 and the first window are unchanged.

    Args:
        noise: (b, c, frames, h, w) initial noise.
        generator: draws the permutations (CPU).

    Returns:
        a new (b, c, frames, h, w) tensor.
    """
    frames = noise.shape[2]
    out = noise.clone()
    span = options.window - 1
    stride = span - options.overlap
    for start in range(options.window, frames, stride):
        length = min(stride, frames - start)
        order = torch.randperm(stride, generator=generator)
        source = torch.arange(start - span, start - span + stride)[order][:length]
        out[:, :, start:start + length] = out[:, :, source.to(noise.device)]
    return out


def fuse_window_predictions(frames: int, options: ContextOptions,
                             predict: Callable[[list[int]], Sequence[torch.Tensor | None]],
                             dim: int = 0) -> list[torch.Tensor | None]:
    """Run ``predict`` on every window of ``frames`` frames (the windows of ``options.schedule``: each starting
    with the global frame 0, or consecutive frames) and fuse its outputs with :func:`fuse_weights`: a host's view
    of :class:`WindowedDenoiser` for any frame axis ``dim`` (0 for frames-as-batch latents ``[F, c, h, w]``, 2 for
    ``(b, c, F, h, w)``).

    Args:
        predict: window's frame indices -> one tensor (or None) per output, frames on ``dim``.

    Returns:
        per output, the fused tensor with ``frames`` frames on ``dim`` (None where every window gave None).
    """
    windows = context_windows(frames, options.window, options.overlap, options.schedule)
    weights = fuse_weights(windows, frames, options.fuse, options.schedule)
    fused: list[torch.Tensor | None] = []
    for window, weight in zip(windows, weights):
        outputs = predict(window)
        fused.extend([None] * (len(outputs) - len(fused)))
        for slot, output in enumerate(outputs):
            if output is None:
                continue
            index = torch.tensor(window, device=output.device)
            shape = [1] * output.ndim
            shape[dim] = len(window)
            if fused[slot] is None:
                size = list(output.shape)
                size[dim] = frames
                fused[slot] = output.new_zeros(size)
            fused[slot].index_add_(dim, index, output * weight.to(output.device, output.dtype).view(shape))
    return fused


class WindowedDenoiser:
    """The inner :class:`~.denoiser.VideoDenoiser` run window by window, its predictions fused; the same
    ``predict`` interface. With frames <= ``options.window`` it is the inner denoiser (bit for bit)."""

    def __init__(self, inner: Any, options: ContextOptions) -> None:
        self.inner = inner
        self.options = options
        self._plan: tuple[int, list[list[int]], list[torch.Tensor]] | None = None

    def __getattr__(self, name: str) -> Any:  # unet, cfg_scale, guidance...: the inner denoiser's settings
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def plan(self, frames: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        """The windows and fuse weights for ``frames`` frames (computed once per frame count)."""
        if self._plan is None or self._plan[0] != frames:
            windows = context_windows(frames, self.options.window, self.options.overlap, self.options.schedule)
            self._plan = (frames, windows, fuse_weights(windows, frames, self.options.fuse, self.options.schedule))
        return self._plan[1], self._plan[2]

    def predict(
        self, x_t: torch.Tensor, timestep: int, exemplar_t: torch.Tensor | None, exemplar_timestep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (guided eps, eps_cond, eps_uncond) for x_t (b, 4, frames, h, w), each fused over the windows.

        ``exemplar_t``: the noised image prompt (b, 4, frames or more, h, w) or None; its first ``window`` frames
        are the image-prompt stream of every window (the stream the model was trained with has the window's
        frame count).
        """
        frames = x_t.shape[2]
        if not self.options.applies(frames):
            return self.inner.predict(x_t, timestep, exemplar_t, exemplar_timestep)
        windows, weights = self.plan(frames)
        features = None
        if exemplar_t is not None:  # the same for every window: captured once per step
            exemplar_t = exemplar_t[:, :, :self.options.window]
            features = self.inner.capture(exemplar_t, timestep, exemplar_timestep, batch=x_t.shape[0])
        fused: list[torch.Tensor | None] = [None, None, None]
        for window, weight in zip(windows, weights):
            index = torch.tensor(window, device=x_t.device)
            outputs = self.inner.predict(x_t[:, :, index], timestep, exemplar_t, exemplar_timestep,
                                         image_prompt_features=features)
            scale = weight.to(x_t.device).view(1, 1, -1, 1, 1)
            for slot, output in enumerate(outputs):
                if output is None:
                    continue
                if fused[slot] is None:
                    fused[slot] = output.new_zeros((*output.shape[:2], frames, *output.shape[3:]))
                fused[slot].index_add_(2, index, output * scale)
        return fused[0], fused[1], fused[2]


def windowed(denoiser: Any, options: ContextOptions | None, frames: int) -> Any:
    """``denoiser`` wrapped in a :class:`WindowedDenoiser` when ``options`` split ``frames`` into windows, else
    ``denoiser`` itself (the plain path, untouched)."""
    if options is None or not options.applies(frames):
        return denoiser
    return WindowedDenoiser(denoiser, options)


def context_options(settings: Any) -> ContextOptions:
    """The :class:`ContextOptions` of a request's settings (``context_window``, ``context_overlap``,
    ``context_fuse``, ``noise_reuse``)."""
    return ContextOptions(settings.context_window, settings.context_overlap, settings.context_fuse,
                          settings.noise_reuse)


def long_video_info(frames: int, options: ContextOptions | None, start_latents: torch.Tensor | None) -> dict[str, Any]:
    """Summary entries of a generation's long-video features (empty for a plain one, so plain summaries are
    unchanged): the windows per step and the known start frames."""
    info: dict[str, Any] = {}
    if options is not None and options.applies(frames):
        info["context_windows"] = len(context_windows(frames, options.window, options.overlap, options.schedule))
        info["context"] = {"window": options.window, "overlap": options.overlap, "fuse": options.fuse,
                           "noise_reuse": options.noise_reuse}
    if start_latents is not None:
        info["start_frames"] = int(start_latents.shape[2])
    return info
