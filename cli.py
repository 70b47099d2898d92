"""What the command lines (river.py, kv_strategies.py, bench.py) share: argument types and one-line errors.

A bad argument ends in argparse's usage and one line "error: argument --name: ..." (exit status 2), a bad model or
data file in one line "error: ..." (exit status 1); neither in a traceback.
"""
import argparse
import sys


def option(convert, check):
    """An argparse type: convert the text, then run a library check on the value; argparse prints the check's
    ValueError as "argument --name: message" and exits 2."""
    def parse(text):
        value = convert(text)
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    parse.__name__ = convert.__name__  # names the type when convert itself refuses: "invalid float value"
    return parse


def check_argument(parser, name, check, *args):
    """Run a check that needs more than the argument's text (the machine, the model's config); its error ends
    the command line like argparse's own. Returns what the check returns."""
    try:
        return check(*args)
    except (ValueError, RuntimeError) as err:
        parser.error(f"argument {name}: {err}")


def fail(message):
    """End the command line on a file error: one line on stderr, exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def reading_files(step, *args, **kwargs):
    """Run a step that reads model or data files; a missing, corrupt or mismatched file ends in fail()."""
    try:
        return step(*args, **kwargs)
    except (OSError, KeyError, ValueError) as err:
        fail(err.args[0] if isinstance(err, KeyError) and err.args else err)  # str(KeyError) adds quotes
