"""The CLI's options for library objects, generated from the registries.

A defence option's type comes from its class's declared ``_constraints`` (an
:class:`~trojanscope._utils.validation.Interval` becomes a range-checked number, an
:class:`~trojanscope._utils.validation.Options` a choice, :class:`~trojanscope._utils.validation.Types`
a bool, int or string) and its default from the constructor (``param_defaults()``); ``-p KEY=VALUE``
settings are checked against the same declarations. This module is the one place in the CLI that
reads a signature (a defence's, an attack's or an architecture factory's): commands ask it which
settings a class takes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import click

from .._utils.validation import Interval, Options, Types
from ..errors import ConfigError
from ._common import parse_params
from ._types import FiniteFloat


class Constrained(click.ParamType):
    """A value parsed by ``base`` and then checked by a class's constraint (its message on failure)."""

    def __init__(self, base: click.ParamType, constraint: Any, name: str) -> None:
        self.base, self.constraint, self.pname, self.name = base, constraint, name, base.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = self.base.convert(value, param, ctx)
        try:
            self.constraint.check(self.pname, v)
        except ConfigError as e:
            self.fail(str(e), param, ctx)
        return v


def _interval_type(c: Interval, name: str) -> click.ParamType:
    low_open, high_open = c.closed in ("right", "neither"), c.closed in ("left", "neither")
    if c.kind is int:
        return click.IntRange(min=c.low, max=c.high, min_open=low_open, max_open=high_open)
    return Constrained(FiniteFloat(), c, name)


def _types_type(c: Types, default: Any) -> click.ParamType:
    kinds = [t for t in c.types if t is not type(None)]
    for kind, ptype in ((bool, click.BOOL), (int, click.INT), (float, FiniteFloat()), (str, click.STRING)):
        if kinds == [kind]:
            return ptype
    return _default_type(default)


def _default_type(default: Any) -> click.ParamType:
    for kind, ptype in ((bool, click.BOOL), (int, click.INT), (float, FiniteFloat())):
        if isinstance(default, kind):
            return ptype
    return click.STRING


def param_type(cls: type, name: str) -> click.ParamType:
    """The click type of ``cls``'s setting ``name``, from its declared constraint (else its default)."""
    c = cls._constraints.get(name)  # type: ignore[attr-defined]
    default = cls.param_defaults().get(name)  # type: ignore[attr-defined]
    if isinstance(c, Interval):
        return _interval_type(c, name)
    if isinstance(c, Options) and all(isinstance(v, str) for v in c.values):
        return click.Choice(list(c.values))
    if isinstance(c, Types):
        return _types_type(c, default)
    return _default_type(default)


def defence_options(name: str, helps: dict[str, str | None], *, into: str = "params",
                    flags: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Options for the settings ``helps`` lists (in that order) of the defence registered as ``name``.

    Each is ``--the-setting`` (or ``flags[setting]``), typed and defaulted from the class; the
    command receives them together as one dict, its keyword ``into`` (several calls merge).
    """
    from ..defenses import DEFENSES

    cls = DEFENSES.get(name)
    defaults = cls.param_defaults()

    def deco(f: Callable) -> Callable:
        for param, text in reversed(list(helps.items())):
            flag = (flags or {}).get(param, "--" + param.replace("_", "-"))
            f = click.option(flag, param, type=param_type(cls, param), default=defaults[param], show_default=True,
                             help=text)(f)

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault(into, {}).update({p: kwargs.pop(p) for p in helps})
            return f(*args, **kwargs)
        return wrapper
    return deco


def takes(cls: type, name: str) -> bool:
    """Whether ``cls``'s constructor has the setting ``name`` (with a default)."""
    return name in cls.param_defaults()  # type: ignore[attr-defined]


def fill(cls: type, given: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``given`` plus those of ``values`` that ``cls`` takes and ``given`` leaves unset."""
    return {**{k: v for k, v in values.items() if takes(cls, k)}, **given}


def _settings(factory: Callable) -> dict[str, inspect.Parameter]:
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    return {n: p for n, p in inspect.signature(target).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def settings(factory: Callable) -> list[str]:
    """The keyword settings a class's constructor or a factory takes."""
    return list(_settings(factory))


def factory_defaults(factory: Callable) -> dict[str, Any]:
    """A class's or factory's settings that have a default, with it."""
    return {n: p.default for n, p in _settings(factory).items() if p.default is not p.empty}


def checked_params(factory: Callable, items: Sequence[str], who: str,
                   hidden: tuple[str, ...] = ()) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for the constructor of ``factory`` (named ``who`` in the error): a key it
    does not take is an error listing those it takes (but ``hidden``); a value its declared
    constraint refuses is an error now, before any data or model is read."""
    kwargs = parse_params(items)
    known = settings(factory)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"{who} takes no parameter {', '.join(unknown)}; "
                          f"it takes {', '.join(p for p in known if p not in hidden)}")
    for key, value in kwargs.items():
        constraint = getattr(factory, "_constraints", {}).get(key)
        if constraint is not None and not isinstance(constraint, (list, tuple)):
            constraint.check(key, value)
    return kwargs


def defence_params(method: str, items: Sequence[str]) -> dict[str, Any]:
    """``-p KEY=VALUE`` settings of the registered defence ``method``; an unknown key is an error."""
    from ..defenses import DEFENSES

    return checked_params(DEFENSES.get(method), items, method, ("device",))


def attack_params(name: str, items: Sequence[str]) -> dict[str, Any]:
    """``-p KEY=VALUE`` settings of the registered attack ``name``; an unknown key is an error."""
    from ..attacks import ATTACKS

    return checked_params(ATTACKS.get(name), items, f"attack {name}")
