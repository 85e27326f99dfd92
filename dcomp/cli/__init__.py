"""The ``dcomp`` command line (dcomp.cli.app). ``main`` is the entry point: it installs the signal
handlers before anything heavy is imported, so Ctrl-C during start-up is one line and exit 130."""


def main() -> None:
    from dcomp.cli import signals

    signals.install()
    import sys

    if sys.argv[1:] == ["--version"]:  # the one answer that needs nothing else loaded
        from dcomp import __version__

        print(f"dcomp {__version__}")
        return
    try:
        from dcomp.cli.app import main as app_main
    except KeyboardInterrupt as e:
        signals.report_and_exit(e)
    try:
        app_main()
    except KeyboardInterrupt as e:  # between the command's end and exit
        signals.report_and_exit(e)
