"""The one exception type that reaches users: a message naming the problem and the fix.

The CLIs turn it into one line on stderr and exit code 2 (a traceback only with --verbose).
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do, in one line."""


def run_cli(app, prog: str, argv: list[str] | None = None) -> None:
    """Run a typer app the way users expect: bad input is one line on stderr and exit code 2, a
    traceback only with --verbose; SIGTERM unwinds like Ctrl-C so temporary outputs are removed."""
    import signal
    import sys

    import click

    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        app(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        if verbose:
            raise
        print(f"{prog}: error: {e.format_message()} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        if verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, click.Abort):
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
