"""The tool's own error types. The CLI turns these (and only these) into exit codes."""


class TurntuneError(Exception):
    """Base class for every error that is the user's to fix (data, config, model folder)."""


class DataError(TurntuneError, ValueError):
    """A record that breaks a rule.

    The message always says where (file:line, turn), which rule, and how to fix it:
    ``data.jsonl:17: turn 3: two assistant messages in a row (merge them or insert the user turn)``.
    """

    def __init__(self, message: str, *, source: str = "", turn: int | None = None, rule: str = "") -> None:
        self.source, self.turn, self.rule, self.detail = source, turn, rule, message
        where = source
        if turn is not None:
            where = f"{where}: turn {turn}" if where else f"turn {turn}"
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(TurntuneError, ValueError):
    """A bad setting: names the setting and the valid values."""


class TemplateError(TurntuneError, ValueError):
    """A chat template that cannot give exact labels for a conversation.

    ``rule`` names why, so the encoder can route it like a data error (``data.on_invalid``):
    ``template_refused`` (the template raised or the sandbox refused it), ``span_not_found`` (no
    exact span for a reply), ``not_rendered`` (the template dropped text a message carries).
    """

    def __init__(self, message: str, *, rule: str = "template_refused") -> None:
        self.rule = rule
        super().__init__(message)


def printable(text: str) -> str:
    """``text`` (a path, or a message holding one) as every terminal can print it.

    A Linux file name may hold bytes that are not UTF-8; Python carries them as lone surrogates
    (``b"\\xff"`` -> ``"\\udcff"``), which a strict UTF-8 stdout refuses with a UnicodeEncodeError.
    They are written back as the escape of the byte the user's file system holds:

    >>> printable("data-\\udcff.jsonl")
    'data-\\\\xff.jsonl'
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes of a decoded file name
    except UnicodeEncodeError:  # a surrogate that no byte decoded to (e.g. from a JSON \\u escape)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
