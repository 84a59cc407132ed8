"""The suite's own rules: property tests draw the same cases on every run (conftest's profile),
whatever ``@settings`` a test gives itself."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st


def test_property_tests_draw_the_same_cases_every_run():
    draws: list[int] = []

    @settings(max_examples=30, deadline=None)  # as the suite's tests do: their own settings
    @given(st.integers())
    def draw(x: int) -> None:
        draws.append(x)

    draw()
    first, draws[:] = list(draws), []
    draw()
    assert draws == first and len(set(first)) > 10
    assert settings.default.derandomize is True and settings.default.database is None
