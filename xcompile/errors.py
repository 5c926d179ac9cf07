"""The one exception type that reaches users: a message naming the problem and the fix.

The CLIs turn it into one line on stderr and exit code 2 (a traceback only with --verbose).
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do, in one line."""


def _click_exceptions():
    """(usage errors, other click errors, exits, aborts) of the click that typer runs on: typer
    0.2x vendors its own copy (typer._click) and no longer depends on click; older typer uses
    click itself. Catching only `click`'s classes lets typer's own escape as tracebacks."""
    import typer

    try:
        from typer._click import exceptions as ce
    except ImportError:
        from click import exceptions as ce
    exits = tuple({typer.Exit, getattr(ce, "Exit", typer.Exit)})
    aborts = tuple({typer.Abort, getattr(ce, "Abort", typer.Abort)})
    return ce.UsageError, ce.ClickException, exits, aborts


def run_cli(app, prog: str, argv: list[str] | None = None) -> None:
    """Run a typer app the way users expect: bad input is one line on stderr and exit code 2, a
    traceback only with --verbose; SIGTERM unwinds like Ctrl-C so temporary outputs are removed."""
    import signal
    import sys

    usage_error, click_error, exits, aborts = _click_exceptions()
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        code = app(args=argv, prog_name=prog, standalone_mode=False)
    except exits as e:
        sys.exit(e.exit_code)
    except usage_error as e:
        if verbose:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is the message (or was printed)
            help_text = e.format_message()
            if help_text and help_text.strip():
                print(help_text, file=sys.stderr)
            sys.exit(2)
        message = " ".join(e.format_message().split())
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)
    except click_error as e:
        if verbose:
            raise
        print(f"{prog}: error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(e.exit_code or 1)
    except UserError as e:
        if verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, *aborts):
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    # non-standalone typer returns an explicit typer.Exit's code instead of raising it
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)
