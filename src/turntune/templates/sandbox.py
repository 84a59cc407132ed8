"""Chat templates are code that ships with model folders: compile them in an immutable sandbox.

The dialect is transformers': trimmed blocks, loop controls, ``raise_exception``,
``strftime_now``, a plain-JSON ``tojson`` and ``{% generation %}`` markers. The sandbox is
Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` with two changes. Sizes: ``*``
and ``**`` refuse the one-step blow-ups (``'x' * 10**10``, ``10 ** 10**9``, a product of two huge
integers) past fixed caps; Jinja's own sandbox caps only ``range``. This is not a resource limit:
repeated ``~``/``+`` inside ``range``'s 100,000 steps, or ``ljust``/``center``/``%``-formatting
with a huge width, can still take memory; only process limits stop a hostile template. Speed: its
verdict on an attribute (``loop.first``, ``messages.append``) is remembered per (type,
attribute name), because the verdict depends on nothing else. Jinja recomputes it on every
access (nine ``isinstance`` checks, three of them against abstract classes), which was a third
of the time of rendering a chat; what it allows and refuses is unchanged.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from turntune.errors import TemplateError

_VERDICTS_MAX = 4096  # (type, attribute) pairs remembered; names can come from data (``x[key]``)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates are written for plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, transformers' marker of assistant text: rendered
    as it is (the spans here are found by construction, markers or not)."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class CachedSandbox(ImmutableSandboxedEnvironment):
    """:class:`ImmutableSandboxedEnvironment` whose attribute verdicts are remembered.

    Jinja's verdict reads only the attribute's name and ``isinstance`` tests of the object (is it a
    function, a method, a type, a frame, a generator, a mutable list/dict/set/deque), never the
    value. ``isinstance`` looks at ``type(obj)`` and at ``obj.__class__``, so a verdict is reused
    only for objects whose two agree; any other object is judged afresh every time.
    """

    # Sizes: ``'x' * 10**10`` or ``10 ** 10**9`` would take the process's memory or minutes of CPU
    # before any check of the result. A chat never needs anything near these caps.
    # Not "+": ChatML templates concatenate with it on every message, and routing each one
    # through Python here doubled their rendering time (measured); it cannot multiply a size.
    intercepted_binops = frozenset({"*", "**"})
    MAX_ITEMS = 10_000_000  # characters of a string, items of a list, made by one *
    MAX_BITS = 100_000  # of an integer made by ** or int * int

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._verdicts: dict[tuple[type, str], bool] = {}

    def call_binop(self, context, operator: str, left, right):
        sized = (str, bytes, list, tuple)
        if operator == "*" and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > self.MAX_BITS:
                raise jinja2.exceptions.SecurityError(f"'*' would make an integer of about "
                                                      f"{left.bit_length() + right.bit_length():,} bits "
                                                      f"(the limit is {self.MAX_BITS:,})")
        elif operator == "*" and (isinstance(left, sized) or isinstance(right, sized)):
            seq, n = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(n, int) and len(seq) * n > self.MAX_ITEMS:
                raise jinja2.exceptions.SecurityError(f"'*' would make {len(seq) * n:,} items (the limit is {self.MAX_ITEMS:,})")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * abs(left).bit_length() > self.MAX_BITS:
                raise jinja2.exceptions.SecurityError(f"'**' would make an integer of about "
                                                      f"{right * abs(left).bit_length():,} bits (the limit is {self.MAX_BITS:,})")
        return super().call_binop(context, operator, left, right)

    def is_safe_attribute(self, obj, attr: str, value) -> bool:
        cls = type(obj)
        if obj.__class__ is not cls:  # a proxy that claims another class: no shortcut
            return super().is_safe_attribute(obj, attr, value)
        key = (cls, attr)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = super().is_safe_attribute(obj, attr, value)
            if len(self._verdicts) < _VERDICTS_MAX:
                self._verdicts[key] = verdict
        return verdict


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox, once per source (templates ship with model folders:
    untrusted code)."""
    env = CachedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from None


@functools.lru_cache(maxsize=32)
def reads_variable(source: str, name: str) -> bool:
    """Whether the template can read the variable ``name`` (``tools``). Exact: a template reaches
    its variables only by name (no loader for includes, no context-passing globals here), so a
    name it never mentions cannot change what it renders."""
    template = compile_template(source)  # compiles first: a syntax error is reported the usual way
    return name in jinja2.meta.find_undeclared_variables(template.environment.parse(source))
