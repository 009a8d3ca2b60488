"""The one exception type for user mistakes.

Anything a user can get wrong (a config key, a layer, a file, a missing dataset) raises
`CnnlabError` with a one-line message naming the culprit. The CLI prints it as
`error: ...` and exits with `exit_code` (2 by default), without a traceback.
Everything else is a bug and keeps its traceback.
"""


class CnnlabError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class NoDigitFound(CnnlabError):
    """A picture with nothing drawn on it (blank paper, an empty canvas, noise): there is no digit
    to classify, so the digit pipeline refuses it instead of guessing. Exit code 1, like a bad file."""

    def __init__(self, message: str = "no digit found: nothing stands out from the background (blank paper, "
                                      "an empty canvas or noise)"):
        super().__init__(message, exit_code=1)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def shorten(value, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for messages that show a user's value: a huge value
    (a YAML alias bomb, a pasted file) must not become a huge error line. Containers are not
    rendered past the limit either: their repr is built piece by piece and stopped early."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlist = shortener.maxdict = shortener.maxtuple = shortener.maxset = 6
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
