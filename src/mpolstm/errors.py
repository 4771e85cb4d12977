"""ConfigError: a bad configuration value that names its field, so that a front end can say it in
its own words (the CLI names its flags) without parsing the message.

A message is written once, as a function of a :class:`FieldNames`: ``str(error)`` is it with the
fields named as the Python API spells them (``max_bond must be a positive integer or None, got 0``),
``error.render({"max_bond": "--max-bond"})`` with a front end's names (``--max-bond must be a
positive integer, got 0``: None, a Python value, is not something a flag can be given).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

__all__ = ["ConfigError", "FieldNames", "must_be", "one_of"]


class FieldNames:
    """How a message names configuration fields: as the API spells them (``api`` true: no ``names``)
    or as a front end does (``names``: field -> its name there; fields it lacks keep their own)."""

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self.api = names is None
        self._names = dict(names or {})

    def __call__(self, field: str) -> str:
        return self._names.get(field, field)

    def offered(self, fields: Sequence[str], phrases: Sequence[str] | None = None) -> list[str]:
        """The names of those of ``fields`` this naming offers (every one for the API), each put into its
        phrase of ``phrases`` (a format string with one ``{}``) when given."""
        phrases = phrases or ["{}"] * len(fields)
        return [p.format(self(f)) for f, p in zip(fields, phrases) if self.api or f in self._names]

    def given(self, field: str, value: object) -> str:
        """A field given a value: ``max_bond=3`` for the API, ``--max-bond 3`` for a front end."""
        return f"{field}={value!r}" if self.api else f"{self(field)} {value!r}"

    def or_none(self) -> str:
        """" or None" where the API is named (None leaves a field unset), else nothing."""
        return " or None" if self.api else ""


def one_of(names: Sequence[str]) -> str:
    """``a``, ``a or b``, ``a, b or c`` (empty for none)."""
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


class ConfigError(ValueError):
    """A bad configuration value: ``field`` is the field at fault, as the configuration spells it;
    ``describe(names)`` writes the message with the fields named by ``names`` (:class:`FieldNames`)."""

    def __init__(self, field: str, describe: Callable[[FieldNames], str]) -> None:
        self.field, self._describe = field, describe
        super().__init__(describe(FieldNames()))

    def render(self, names: Mapping[str, str]) -> str:
        """The message with the fields named by a front end (``names``: field -> its name)."""
        return self._describe(FieldNames(names))

    def prefixed(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` before its message (e.g. the file it is about)."""
        return ConfigError(self.field, lambda n: prefix + self._describe(n))

    def __reduce__(self):  # a copy or a pickle keeps the message (the describe function may not pickle)
        return ValueError, (str(self),)


def must_be(field: str, expected: str, value: object, *, optional: bool = False, where: str = "") -> ConfigError:
    """``<field> must be <expected>[ or None], got <value>`` (after ``where``, e.g. ``"overrides['x']: "``)."""
    return ConfigError(field, lambda n: f"{where}{n(field)} must be {expected}"
                                        f"{n.or_none() if optional else ''}, got {value!r}")
