"""Symbolic size expressions of ``.pt2`` programs, parsed here and re-emitted from the parse tree.

A program stores a symbolic size as sympy text (``Symbol('s77', positive=True, integer=True)``,
``Mul(Integer(2), Symbol('s0', ...))``) that torch hands to ``sympy.sympify``, which *evaluates*
it: any Python can go there. This module is the only thing that reads that text. Its grammar:

.. code-block:: text

    expr  := sum (CMP sum)?                      CMP: < <= > >= == !=
    sum   := term (('+' | '-') term)*
    term  := unary (('*' | '//' | '%') unary)*
    unary := '-' unary | atom
    atom  := INT | SYMBOL | '(' expr ')'
           | 'Integer' '(' ['-'] INT ')'
           | 'Symbol' '(' QUOTED_SYMBOL (',' FLAG '=' ('True' | 'False'))* ')'
           | FUNC '(' expr (',' expr)* ')'

with ``SYMBOL`` = ``s<digits>`` (backed sizes) or ``u<digits>`` (unbacked), ``FLAG`` one of
``integer positive nonnegative``, ``FUNC`` one of :data:`FUNCTIONS` (sums, products, floor
division, modulo, Min / Max, comparisons), integers of at most 19 digits, and at most
:data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` levels. :func:`canonical` returns the text
rebuilt from the tree (``srepr`` form, which torch's reader understands); anything else raises
:class:`SymExprError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LENGTH = 4096
MAX_DEPTH = 32

#: Function names of sympy / torch's symbolic-shape functions that may appear, with their arity
#: (None: two or more).
FUNCTIONS: dict[str, int | None] = {
    "Add": None, "Mul": None, "FloorDiv": 2, "Mod": 2, "PythonMod": 2, "CleanDiv": 2, "Min": None, "Max": None,
    "Eq": 2, "Ne": 2, "StrictLessThan": 2, "LessThan": 2, "StrictGreaterThan": 2, "GreaterThan": 2,
}
_FLAGS = frozenset({"integer", "positive", "nonnegative"})
_SYMBOL = re.compile(r"[su][0-9]{1,9}\Z")
_TOKEN = re.compile(r"\s*(?:(?P<int>[0-9]{1,19})(?![0-9])|(?P<name>[A-Za-z_][A-Za-z0-9_]{0,63})|"
                    r"(?P<str>'[su][0-9]{1,9}')|(?P<op>//|<=|>=|==|!=|[-+*%<>(),=]))")
_INFIX = {"+": "Add", "*": "Mul", "//": "FloorDiv", "%": "PythonMod",
          "<": "StrictLessThan", "<=": "LessThan", ">": "StrictGreaterThan", ">=": "GreaterThan",
          "==": "Eq", "!=": "Ne"}


class SymExprError(ValueError):
    """The text is not a symbolic size expression of the grammar above."""


@dataclass(frozen=True)
class Int:
    value: int


@dataclass(frozen=True)
class Sym:
    name: str
    flags: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Node", ...]


Node = Int | Sym | Call


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise SymExprError(f"unexpected {text[pos:pos + 12]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))  # type: ignore[arg-type]
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        if len(text) > MAX_LENGTH:
            raise SymExprError(f"longer than {MAX_LENGTH} characters")
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        t = self.peek()
        if t is None or (value is not None and t[1] != value) or (kind is not None and t[0] != kind):
            raise SymExprError(f"expected {value or kind}, got {t[1] if t else 'the end'!r}")
        self.i += 1
        return t[1]

    def at(self, value: str) -> bool:
        t = self.peek()
        return t is not None and t[0] == "op" and t[1] == value

    def parse(self) -> Node:
        node = self.expr()
        if self.peek() is not None:
            raise SymExprError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SymExprError(f"nested deeper than {MAX_DEPTH}")
        left = self.sum()
        t = self.peek()
        if t and t[0] == "op" and t[1] in ("<", "<=", ">", ">=", "==", "!="):
            self.i += 1
            left = Call(_INFIX[t[1]], (left, self.sum()))
        self.depth -= 1
        return left

    def sum(self) -> Node:
        node = self.term()
        while self.at("+") or self.at("-"):
            op = self.take()
            right = self.term()
            node = Call("Add", (node, right if op == "+" else Call("Mul", (Int(-1), right))))
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.at("*") or self.at("//") or self.at("%"):
            op = self.take()
            node = Call(_INFIX[op], (node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.at("-"):
            self.take()
            inner = self.unary()
            return Int(-inner.value) if isinstance(inner, Int) else Call("Mul", (Int(-1), inner))
        return self.atom()

    def atom(self) -> Node:
        t = self.peek()
        if t is None:
            raise SymExprError("unexpected end")
        kind, value = t
        if kind == "int":
            self.i += 1
            return Int(int(value))
        if kind == "op" and value == "(":
            self.take("(")
            node = self.expr()
            self.take(")")
            return node
        if kind != "name":
            raise SymExprError(f"unexpected {value!r}")
        self.i += 1
        if _SYMBOL.match(value):
            return Sym(value)
        if value == "Integer":
            self.take("(")
            neg = self.at("-") and bool(self.take())
            n = int(self.take(kind="int"))
            self.take(")")
            return Int(-n if neg else n)
        if value == "Symbol":
            self.take("(")
            name = self.take(kind="str")[1:-1]
            flags = []
            while self.at(","):
                self.take(",")
                flag = self.take(kind="name")
                if flag not in _FLAGS:
                    raise SymExprError(f"unknown symbol assumption {flag!r}")
                self.take("=")
                truth = self.take(kind="name")
                if truth not in ("True", "False"):
                    raise SymExprError(f"assumption {flag} must be True or False")
                flags.append((flag, truth == "True"))
            self.take(")")
            return Sym(name, tuple(sorted(set(flags))))
        if value in FUNCTIONS:
            self.take("(")
            args = [self.expr()]
            while self.at(","):
                self.take(",")
                args.append(self.expr())
            self.take(")")
            arity = FUNCTIONS[value]
            if (arity is None and len(args) < 2) or (arity is not None and len(args) != arity):
                raise SymExprError(f"{value} takes {arity or 'two or more'} arguments, got {len(args)}")
            return Call(value, tuple(args))
        raise SymExprError(f"{value!r} is not a symbol, an integer or an allowed function")


def parse(text: str) -> Node:
    """The parse tree of ``text`` (raises :class:`SymExprError`)."""
    if not isinstance(text, str):
        raise SymExprError("not text")
    return _Parser(text).parse()


def emit(node: Node) -> str:
    """``srepr``-style text of a parse tree (only names and digits this module chose)."""
    if isinstance(node, Int):
        return f"Integer({node.value})"
    if isinstance(node, Sym):
        flags = "".join(f", {k}={'True' if v else 'False'}" for k, v in node.flags)
        return f"Symbol('{node.name}'{flags})"
    return f"{node.func}({', '.join(emit(a) for a in node.args)})"


def canonical(text: str) -> str:
    """``text`` parsed and re-emitted from its parse tree."""
    return emit(parse(text))


def symbol_name(text: str) -> str:
    """A bare symbol name (a range-constraint key): ``s<digits>`` or ``u<digits>``."""
    if not isinstance(text, str) or not _SYMBOL.match(text):
        raise SymExprError("not a symbol name s<digits> / u<digits>")
    return text
