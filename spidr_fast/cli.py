"""What every command line of the project shares (python -m spidr_fast.train, .evaluate, .extract and the
benchmarks): a wrong path or value is one line on stderr that names it, `error: ...`, and exit status 2, never a
traceback; argparse's own errors take the same form."""

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# Errors in what the user gave (a missing or unusable path, a value out of range), not in the program.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
USER_ERROR_STATUS = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line like the others instead of the usage and then the error, and
    whose description (a module's docstring) is printed as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - argparse's own arguments
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_STATUS, f"error: {message} (see {self.prog} --help)\n")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type`: a number of `kind` (int, float) above 0."""

    def parse(text: str) -> Any:  # noqa: ANN401 - a number of `kind`
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in "invalid <type> value"
    return parse


def report_user_errors(run: Callable[..., Any], *args: Any) -> int:  # noqa: ANN401 - whatever `run` takes
    """`run(*args)`'s exit status: its own when it returns an int, else 0; a user error is printed as one line
    and gives 2."""
    try:
        status = run(*args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_STATUS
    return status if isinstance(status, int) else 0
