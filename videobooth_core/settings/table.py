"""The table a command's settings are made of: :class:`Setting` (one setting's kind, default, range, choices, help,
flag and key, and its :meth:`~Setting.check`), :func:`setting_field` and :func:`settings_table` (a dataclass's
fields to a table by key), :func:`add_setting_flags` (a table to argparse flags) and :func:`check_number` (a
number that is not a setting, checked as settings are). Generation's, VideoCrafter's and the trainer's settings
are tables of this kind."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SamplingError, VideoBoothError
from .constants import LORA_STRENGTH_RANGE, MAX_SEED

Names = Callable[[str], "str | None"]
"""How one road names an input in its messages, by its jobs key (``cfg``, ``image``...): the command line by its
flag, a jobs line by its key, a node by its widget; None keeps the setting's own label."""


@dataclass(frozen=True)
class Setting:
    """What is known about one setting. ``kind``: ``int``, ``float``, ``str``, ``bool``, ``pair`` (two
    floats, start < end), ``choice`` (one of ``choices``, of any type; the command line reads it with ``parse``)
    or ``strs`` (a non-empty list of non-empty strings; ``nargs="+"`` on the command line). Bounds are inclusive
    except ``above`` and ``below`` (value must exceed / stay under it).
    A setting whose default is None may also be None (not set)."""

    kind: str
    default: Any
    help: str
    key: str = ""
    """Jobs key, config-file key and command-line ``dest``; the field name when empty."""
    flag: str = ""
    """Command-line flag; ``--key`` with dashes when empty (``--no-...`` for a setting that defaults to True)."""
    label: str = ""
    """Name used in messages; the key when empty."""
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    multiple_of: int | None = None
    choices: tuple[Any, ...] | None = None
    name: str = ""
    """The dataclass field (filled in by :func:`settings_table`)."""
    section: str = "request"
    """``request`` (a field of GenerationSettings), ``options`` (a field of SamplingOptions), ``train`` (a field
    of the trainer's TrainConfig)."""
    required: bool = False
    """No default: the command line or the config file must give it."""
    error: type[VideoBoothError] = SamplingError
    """The error a bad value raises (the trainer's: TrainingError)."""
    shown_default: str = ""
    """The default as the help shows it, when the value alone would not say it."""
    parse: Callable[[str], Any] | None = None
    """A ``choice`` setting's command-line type: the typed text to the value (e.g. ``"1"`` to 1)."""
    refused: tuple[tuple[Any, str], ...] = ()
    """Values refused with their own reason, as ``(value, why and the fix)`` pairs (another family's sampler)."""

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` if it is valid for this setting; otherwise ``error`` naming it (as ``name``, how the caller's
        road calls it: a flag, a jobs key, a config-file key, a widget; the label when None) and the fix."""
        what = name or self.label or self.key
        if value is None and self.default is None and not self.required:
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise self.error(f"{what} must be true or false, got {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise self.error(f"{what} must be a string, got {value!r}")
            for refused, why in self.refused:
                if value == refused:
                    raise self.error(f"{what} {value!r} is not available: {why}")
            if self.choices is not None and value not in self.choices:
                raise self.error(f"unknown {what} {value!r}; choose one of {', '.join(self.choices)}")
            return value
        if self.kind == "pair":
            return self._check_pair(value, what)
        if self.kind == "choice":  # any type; True is not 1 here
            if isinstance(value, bool) or value not in self.choices:
                raise self.error(f"{what} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return value
        if self.kind == "strs":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value \
                    or not all(isinstance(item, str) and item for item in value):
                raise self.error(f"{what} must be a list of one or more non-empty strings, got {value!r}; "
                                 f"the default is {self.describe_default()}")
            return tuple(value)
        whole = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
            raise self.error(f"{what} must be {'a whole number' if whole else 'a number'}, got {value!r}")
        if self.choices is not None:
            if value not in self.choices:
                raise self.error(f"{what} must be one of {', '.join(map(str, self.choices))}, got {value}")
            return value
        if not math.isfinite(value):
            raise self.error(f"{what} must be a finite number, got {value}; {self._fix()}")
        if self.multiple_of and (value < self.multiple_of or value % self.multiple_of):
            nearest = max(self.multiple_of, round(value / self.multiple_of) * self.multiple_of)
            raise self.error(f"{what} must be a positive multiple of {self.multiple_of}, got {value}; try {nearest}")
        default = f"the default is {self.describe_default()}"
        if self.above is not None and not value > self.above:
            raise self.error(f"{what} must be greater than {_number(self.above)}, got {value}; {default}")
        if self.below is not None and not value < self.below:
            raise self.error(f"{what} must be less than {_number(self.below)}, got {value}; {default}")
        if self.minimum is not None and value < self.minimum:
            most = f" and at most {_number(self.maximum)}" if self.maximum is not None else ""
            raise self.error(f"{what} must be at least {_number(self.minimum)}{most}, got {value}; {default}")
        if self.maximum is not None and value > self.maximum:
            raise self.error(f"{what} must be between {_number(self.minimum)} and {_number(self.maximum)}, "
                             f"got {value}; {default}")
        return value

    def _check_pair(self, value: Any, what: str) -> tuple[float, float]:
        if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
            raise self.error(f"{what} must be two numbers (start, end), got {value!r}")
        start, end = float(value[0]), float(value[1])
        low, high = _number(self.minimum), _number(self.maximum)
        if not (math.isfinite(start) and math.isfinite(end)) or not self.minimum <= start < end <= self.maximum:
            example = f"{what} 0 0.5" if what.startswith("--") else "start 0 and end 0.5"  # a flag, or any other name
            raise self.error(f"{what} must satisfy {low} <= start < end <= {high}, got ({value[0]}, {value[1]}); "
                             f"e.g. {example} for the first half of the steps ({low} {high} is official)")
        return start, end

    def _fix(self) -> str:
        bounds = []
        if self.above is not None:
            bounds.append(f"above {_number(self.above)}")
        if self.below is not None:
            bounds.append(f"below {_number(self.below)}")
        if self.minimum is not None and self.maximum is not None:
            bounds.append(f"between {_number(self.minimum)} and {_number(self.maximum)}")
        elif self.minimum is not None:
            bounds.append(f"at least {_number(self.minimum)}")
        elif self.maximum is not None:
            bounds.append(f"at most {_number(self.maximum)}")
        return f"use a value {' and '.join(bounds)} (default {self.describe_default()})"

    def describe_default(self) -> str:
        """The default as a user types it on the command line."""
        if self.shown_default:
            return self.shown_default
        if self.kind == "pair":
            return " ".join(_number(v) for v in self.default)
        return repr(self.default) if isinstance(self.default, str) else _number(self.default)


def _number(value: Any) -> str:
    if value == MAX_SEED:
        return "2**64 - 1"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


REQUIRED = object()
"""The default of a setting that has none (:func:`setting_field`): the user must give it."""


def setting_field(kind: str, default: Any, help: str, **details: Any) -> Any:
    """A dataclass field described by a :class:`Setting` (collected by :func:`settings_table`); ``default``
    :data:`REQUIRED` makes a field without a default."""
    if default is REQUIRED:
        return field(metadata={"setting": Setting(kind, None, help, required=True, **details)})
    return field(default=default, metadata={"setting": Setting(kind, default, help, **details)})


def settings_table(*sections: tuple[str, type], error: type[VideoBoothError] = SamplingError) -> dict[str, Setting]:
    """Every :class:`Setting` of the dataclasses of ``sections`` ((section name, class) pairs) by key, in field
    order, with key, flag, label, field name, section and error filled in: the one table that a command's flags,
    its jobs or config-file keys, its widgets and its checks are made from."""
    table = {}
    for section, cls in sections:
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("setting")
            if spec is None:
                continue
            key = spec.key or f.name
            flag = spec.flag or "--" + ("no-" if spec.kind == "bool" and spec.default is True else "") \
                + key.replace("_", "-")
            table[key] = dataclasses.replace(spec, key=key, flag=flag, label=spec.label or key, name=f.name,
                                             section=section, error=error)
    return table


def check_number(flag: str, value: Any, default: Any, *, whole: bool = False, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None) -> Any:
    """One numeric input of a command that is not a generation setting (``--limit``, ``--lr``, a LoRA's
    strength, ``--best-of``...) checked as the settings are (:meth:`Setting.check`): a number, finite, in its
    range; ``None`` (not given) passes. SamplingError naming ``flag``, the value and the fix otherwise."""
    if value is None:
        return None
    spec = Setting("int" if whole else "float", default, "", key=flag, flag=flag, label=flag, minimum=minimum,
                   maximum=maximum, above=above)
    return spec.check(value)


def check_lora_strength(value: Any, what: str = "the LoRA strength") -> float:
    """A LoRA's strength: a finite number within :data:`LORA_STRENGTH_RANGE` (SamplingError otherwise)."""
    low, high = LORA_STRENGTH_RANGE
    return check_number(what, value, 1.0, minimum=low, maximum=high)


def add_setting_flags(parser: Any, table: Mapping[str, Setting], *, unset: bool = False,
                      group_of: Callable[[Setting], Any] | None = None) -> None:
    """One command-line flag per setting of ``table`` (argparse): flag, ``dest`` (the key), type, choices and
    help with the default come from the table. ``unset``: every flag defaults to None, so a value not given
    on the command line can come from a config file (the trainer); otherwise to the setting's default.
    ``group_of``: the argparse group a setting's flag goes in (default ``parser``)."""
    for spec in table.values():
        group = group_of(spec) if group_of is not None else parser
        if spec.kind == "bool":
            state = spec.shown_default or ("runs" if spec.default else "off")
            group.add_argument(spec.flag, dest=spec.key, action="store_const", const=not spec.default,
                               default=None if unset else spec.default, help=f"{spec.help} (default: {state})")
            continue
        kind = spec.parse or {"int": int, "float": float, "pair": float, "str": str, "strs": str,
                              "choice": str}[spec.kind]
        extra: dict[str, Any] = {"nargs": 2, "metavar": ("START", "END")} if spec.kind == "pair" else {}
        if spec.kind == "strs":
            extra["nargs"] = "+"
        if spec.choices:
            extra["choices"] = spec.choices
        shown = "required" if spec.required else f"default: {spec.describe_default()}"
        group.add_argument(spec.flag, dest=spec.key, type=kind, default=None if unset else spec.default,
                           help=f"{spec.help} ({shown})", **extra)
