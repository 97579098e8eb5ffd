"""Checks of user-given values, one helper per kind of value, each error naming the field, the value and the fix.

The entry points check every value they take in one place before any work (train_setup.py, sample.py,
eval/score.py, compare.py, analyze.py), mostly through tables that map a config key to a `Check`: a new field is one
line. Each check returns the value it accepted (an int for `Int`, a float for `Float`, ...), so a caller may use it.

    check_fields(config, {"train.steps": Int(1), "optim.lr": Float(0, low_open=True)})
    # ValueError: train.steps='abc': not an integer; expected an integer >= 1

Values come from YAML and command lines, so "abc", 1.5, true, nan and 1e30 all reach here: an integer must be an
int (not a bool, not a float), a float must be a finite number, and a name must be one of a listed set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

# Seeds reach NumPy (`np.random.seed` takes 0 .. 2**32 - 1: accelerate's set_seed, KID's subsets) and torch.
SEED_MAX = 2**32 - 1
ABSENT = object()  # what `lookup` returns for a key the config does not have


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def fail(field: str, value: Any, problem: str, fix: str) -> ValueError:
    """The one error format: `field=value: problem; fix`."""
    return ValueError(f"{field}={_show(value)}: {problem}; {fix}")


def _interval(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (either end open-ended when None); `optional` also takes None."""

    low: int | None = None
    high: int | None = None
    optional: bool = False
    fix: str = ""

    def __call__(self, field: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        expected = f"an integer {_interval(self.low, self.high)}".rstrip() + (" or null" if self.optional else "")
        fix = self.fix or f"set {field} to {expected}"
        if not isinstance(value, Integral) or isinstance(value, bool):
            raise fail(field, value, "not an integer", fix)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise fail(field, value, "out of range", fix)
        return int(value)


@dataclass(frozen=True)
class Float:
    """A finite number in the interval from low to high (ends closed unless `low_open` / `high_open`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    fix: str = ""

    def __call__(self, field: str, value: Any) -> float | None:
        if value is None and self.optional:
            return None
        expected = f"a finite number {_interval(self.low, self.high, self.low_open, self.high_open)}".rstrip()
        fix = self.fix or f"set {field} to {expected}" + (" or null" if self.optional else "")
        if not isinstance(value, Real) or isinstance(value, bool):
            raise fail(field, value, "not a number", fix)
        if not math.isfinite(value):
            raise fail(field, value, "not finite", fix)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise fail(field, value, "out of range", fix)
        return float(value)


@dataclass(frozen=True)
class Choice:
    """One of `choices` (names of kinds, objectives, schedulers, modes, ...); `optional` also takes None."""

    choices: Collection[str]
    optional: bool = False

    def __call__(self, field: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or value not in self.choices:
            listed = sorted(self.choices) if not isinstance(self.choices, Sequence) else list(self.choices)
            raise fail(field, value, "unknown name", f"choose one of {listed}" + (" or null" if self.optional else ""))
        return value


@dataclass(frozen=True)
class Bool:
    """true or false (YAML's booleans; "yes" or 1 are refused rather than guessed)."""

    def __call__(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise fail(field, value, "not a boolean", "set true or false")
        return value


@dataclass(frozen=True)
class IntList:
    """A list of integers, each checked by `item`; `nonempty` and `distinct` as asked; `optional` also takes None."""

    item: Int
    nonempty: bool = True
    distinct: bool = False
    optional: bool = False

    def __call__(self, field: str, value: Any) -> list[int] | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise fail(field, value, "not a list", f"give a list, e.g. {field}=[0,1]")
        if self.nonempty and len(value) == 0:
            raise fail(field, list(value), "empty", f"give at least one value, e.g. {field}=[0]")
        items = [self.item(f"{field}[{i}]", v) for i, v in enumerate(value)]
        if self.distinct and len(set(items)) != len(items):
            raise fail(field, items, "repeats a value", "give each value once")
        return items


@dataclass(frozen=True)
class NameList:
    """A non-empty list of distinct names, each one of `choices` (attention kinds, objectives, ...); `optional`
    also takes None."""

    choices: Collection[str]
    optional: bool = False

    def __call__(self, field: str, value: Any) -> list[str] | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) == 0:
            raise fail(field, value, "not a non-empty list of names", f"give a list, e.g. {field}=[{_example(self)}]")
        names = [Choice(self.choices)(f"{field}[{i}]", v) for i, v in enumerate(value)]
        if len(set(names)) != len(names):
            raise fail(field, names, "repeats a name", "give each name once")
        return names


def _example(names: NameList) -> str:
    return ",".join(sorted(names.choices)[:2])


SEED = Int(0, SEED_MAX)
Check = Int | Float | Choice | Bool | IntList | NameList


def lookup(config: Mapping, key: str) -> Any:
    """The value at dotted `key` of nested mappings, or `ABSENT`."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ABSENT
        node = node[part]
    return node


def check_fields(config: Mapping, checks: Mapping[str, Check]) -> None:
    """Apply `checks` (dotted key → check) to the plain nested `config`; a key the config lacks is skipped (data
    groups differ in their keys)."""
    for key, check in checks.items():
        value = lookup(config, key)
        if value is not ABSENT:
            check(key, value)


# ----------------------------------------------------------------------------------------------------------
# Output paths: checked before the work whose result they receive


def _writable_folder(field: str, path: Path) -> None:
    """The nearest existing ancestor of `path` is a folder this process may write into (makedirs then works)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise fail(field, path, f"{parent} is a file, not a folder", f"set {field} to a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(field, path, f"{parent} is not writable", f"set {field} to a path you may write")


def check_output_file(field: str, value: Any, suffixes: Sequence[str]) -> Path:
    """A file to be written: a path ending in one of `suffixes` (any case), not an existing folder, under a
    writable folder."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise fail(field, value, "not a path", f"set {field}=<a file ending in {' or '.join(suffixes)}>")
    path = Path(value)
    if path.is_dir():
        raise fail(field, path, "an existing folder", f"give a file path, e.g. {path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        raise fail(field, path, f"not a {' or '.join(suffixes)} file name",
                   f"end it in {suffixes[0]}, e.g. {path.with_name(path.stem + suffixes[0])}")
    _writable_folder(field, path)
    return path


def check_output_dir(field: str, value: Any) -> Path:
    """A folder to be written into: not an existing file, under a writable folder (writable itself if it exists)."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise fail(field, value, "not a path", f"set {field}=<a folder>")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise fail(field, path, "an existing file, not a folder", f"set {field} to a folder path")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise fail(field, path, "not writable", f"set {field} to a folder you may write")
    _writable_folder(field, path)
    return path


def check_device(field: str, value: Any) -> str:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`, and available on this machine."""
    import torch

    valid = "auto, cpu, cuda, cuda:N or mps"
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise fail(field, value, "not a device name", f"choose {valid}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail(field, value, "no CUDA device on this machine", "use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise fail(field, value, f"this machine has {torch.cuda.device_count()} CUDA device(s)",
                   f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise fail(field, value, "no MPS device on this machine", "use auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise fail(field, value, "not a device this toolkit runs on", f"choose {valid}")
    return str(value)
