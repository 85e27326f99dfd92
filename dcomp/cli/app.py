"""The ``dcomp`` command: global options, error handling, and the sub-commands.

Each sub-command lives in its own module and only parses, calls the library, and renders.
Global options may stand before or after the sub-command (``dcomp eval m.pt --json`` works):
``DcompGroup`` moves them in front before click parses.

Errors: a ``DcompError`` prints ``error: <message>`` on stderr and exits 1 (``UsageError``: 2);
click usage errors exit 2 with one line; anything unexpected prints one line that says to rerun
with ``--debug``, which shows the traceback.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # older typer uses click itself
    from click import exceptions as click_exc

from dcomp import __version__
from dcomp.cli import common, signals
from dcomp.errors import DcompError

# Global options: name -> takes a value.
GLOBAL_OPTIONS = {"--json": False, "--quiet": False, "-q": False, "--debug": False, "--trust-pickle": False,
                  "--seed": True, "--threads": True, "--device": True}


def hoist_global_options(args: list[str]) -> list[str]:
    """Move global options found after the sub-command name in front of it."""
    front: list[str] = []
    rest: list[str] = []
    seen_command = False
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            rest.extend(args[i:])
            break
        name = tok.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            takes_value = GLOBAL_OPTIONS[name] and "=" not in tok
            chunk = args[i:i + 2] if takes_value else [tok]
            (front if seen_command else rest).extend(chunk)
            i += len(chunk)
            continue
        if not seen_command and not tok.startswith("-"):
            seen_command = True
        rest.append(tok)
        i += 1
    return front + rest


class _Interrupted(Exception):
    """A KeyboardInterrupt (Ctrl-C, SIGTERM) carried past typer, which would turn it into exit 130
    without a word (and, outside standalone mode, into a return value that was taken for 0)."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


class DcompGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(e) from None

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Interrupted(e) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        args = hoist_global_options(args)
        debug = "--debug" in args or common.env_flag("DCOMP_DEBUG")
        def err(msg: str) -> None:  # plain text: one line, never wrapped, no markup
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

        try:
            rv = super().main(args=args, prog_name=prog_name or "dcomp", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0  # typer returns Exit codes
            if code == 130:  # typer's own translation of a KeyboardInterrupt we did not see
                err("interrupted")
        except _Interrupted as e:
            err(signals.message(e.original))
            code = signals.exit_code(e.original)
        except (typer.Exit, getattr(click_exc, "Exit", typer.Exit)) as e:
            code = e.exit_code
        except getattr(click_exc, "NoArgsIsHelpError", ()) as e:
            sys.stderr.write(e.format_message() + "\n")  # the help text
            code = 2
        except (typer.Abort, getattr(click_exc, "Abort", typer.Abort)):
            err("aborted")
            code = 130
        except click_exc.ClickException as e:
            hint = ""
            if isinstance(e, click_exc.UsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            err(f"error: {e.format_message()}{hint}")
            code = e.exit_code
        except DcompError as e:
            if debug:
                traceback.print_exc()
            err(f"error: {e}")
            code = e.exit_code
        except KeyboardInterrupt as e:
            err(signals.message(e))
            code = signals.exit_code(e)
        except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            interrupt = signals.interrupt_behind(e)
            if interrupt is not None:  # a library turned our KeyboardInterrupt into its own error
                err(signals.message(interrupt))
                code = signals.exit_code(interrupt)
            else:
                if debug:
                    traceback.print_exc()
                first = (str(e).splitlines() or [""])[0]
                err(f"error: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)")
                code = 1
        if standalone_mode:
            if code >= 128 and code - 128 in (2, 1, 15):  # after an interrupt: no interpreter shutdown
                signals.exit_now(code)
            signals.finishing()  # a signal during the shutdown must not turn this code into a kill
            sys.exit(code)
        return code


app = typer.Typer(
    cls=DcompGroup,
    name="dcomp",
    help="Deep Compression for PyTorch models: prune, retrain, quantize, pack, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"dcomp {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="print a machine-readable JSON summary")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or tables on stderr")] = False,
    seed: Annotated[int, typer.Option("--seed", help="random seed (training, sampling, initialisation)")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch and onnxruntime")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto")] = "cpu",
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="run code a file holds or names: pickled models, TorchScript inside a checkpoint or .dcz, a module:factory the file names (info and inspect never run any)")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
):
    """Global options; they may also follow the sub-command."""
    if device not in ("cpu", "cuda", "auto"):
        raise typer.BadParameter(f"--device must be cpu, cuda or auto, got {device!r}")
    resolved = "cpu"
    if device != "cpu":  # torch only when asked: `dcomp --help`, `zoo`, `inspect` start fast without it
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise DcompError("--device cuda: no CUDA device is available here; use --device cpu")
        resolved = "cuda" if torch.cuda.is_available() else "cpu"
    seed_source = ctx.get_parameter_source("seed")
    common.state = common.GlobalOptions(json=json_, quiet=quiet, debug=debug, seed=seed,
                                        seed_given=seed_source is not None and seed_source.name != "DEFAULT",
                                        threads=threads, device=resolved, trust_pickle=trust_pickle)
    common.threads_env()
    if resolved != "cpu" or "dcomp.train" in sys.modules:  # cpu is the training default
        from dcomp.train import use_device

        use_device(resolved)


# shown under every command's --help: global options may stand before or after the command
GLOBAL_HELP = ("Global options (before or after the command): --json (JSON summary), -q/--quiet, "
               "--seed N, --threads N, --device cpu|cuda|auto, --debug (tracebacks), --trust-pickle, "
               "--version. Exit status: 0 done, 1 error, 2 usage error, 130 interrupted (143 on SIGTERM).")


def _register() -> None:
    from dcomp.cli import bench, distill, export, info, pack, plot, prune, quantize, recipe, retrain, run, sweep, train, zoo
    from dcomp.cli import factorize
    from dcomp.cli import search
    from dcomp.cli import eval as eval_cmd

    commands = [("train", train.train), ("eval", eval_cmd.eval_), ("info", info.info), ("zoo", zoo.zoo),
                ("prune", prune.prune), ("retrain", retrain.retrain), ("quantize", quantize.quantize),
                ("pack", pack.pack), ("unpack", pack.unpack), ("inspect", pack.inspect),
                ("export", export.export), ("bench", bench.bench), ("run", run.run),
                ("factorize", factorize.factorize),
                ("distill", distill.distill), ("sweep", sweep.sweep), ("plot", plot.plot),
                ("search", search.search)]
    for name, fn in commands:  # help: the function's docstring, else its module's
        app.command(name, help=fn.__doc__ or sys.modules[fn.__module__].__doc__, epilog=GLOBAL_HELP)(fn)
    app.add_typer(recipe.recipe_app, name="recipe", epilog=GLOBAL_HELP)


_register()


def main() -> None:
    signals.install()
    app()


if __name__ == "__main__":
    main()
