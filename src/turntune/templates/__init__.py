"""Chat formats: a conversation becomes token ids with the trained positions known by construction.

Every template returns a :class:`Rendered`; the strategies in ``encoding.py`` only slice it.
"""
from turntune.templates.base import Rendered, Template

__all__ = ["Rendered", "Template"]
