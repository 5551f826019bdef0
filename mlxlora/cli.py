"""The `mlxlora` command line: the Click group; every command lives in mlxlora/commands/.

Options default to None ("not given"), so the dataclasses in config.py stay the only home of
defaults and a --config file can fill what the command line leaves out.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from .errors import MlxloraError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that staging folders are removed on the way out."""


def _sigterm(signum, frame):
    raise Terminated()


class _Group(click.Group):
    """Turns every MlxloraError into a one-line `Error: ...` and exit code 1 (no traceback); Ctrl-C and
    SIGTERM into one line too (exit 130 / 143), after the writes under way removed their staging folders."""

    def invoke(self, ctx):
        try:
            old = signal.signal(signal.SIGTERM, _sigterm)
        except ValueError:  # not the main thread (an embedding application): leave signals alone
            old = None
        try:
            return super().invoke(ctx)
        except MlxloraError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
            err = click.ClickException(f"stopped by {how} before the end; nothing was replaced (every output is "
                                       "written beside its destination and swapped in only when complete)")
            err.exit_code = 143 if isinstance(e, Terminated) else 130
            raise err from None
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxlora")
def cli():
    """Fine-tune language models with LoRA / DoRA / QLoRA on MLX."""


# (module, attribute holding a click.Command or click.Group), in the order `mlxlora --help` lists them.
COMMAND_MODULES = [
    ("mlxlora.commands.train", "train"),
    ("mlxlora.commands.infer", "generate"),
    ("mlxlora.commands.infer", "eval_cmd"),
    ("mlxlora.commands.data", "data"),
    ("mlxlora.commands.demo", "demo"),
    ("mlxlora.commands.fuse", "fuse"),
    ("mlxlora.commands.hub", "upload"),
    ("mlxlora.commands.hub", "export_model"),
    ("mlxlora.commands.interop", "convert"),
    ("mlxlora.commands.interop", "export_adapter"),
    ("mlxlora.commands.plan", "plan"),
    ("mlxlora.commands.serve", "serve"),
    ("mlxlora.commands.serve", "chat"),
]


def _register_commands() -> None:
    for module, attr in COMMAND_MODULES:
        cli.add_command(getattr(importlib.import_module(module), attr))


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: on Linux CPU, re-executes once with OpenBLAS preloaded (see blas.py)."""
    from .blas import maybe_reexec

    maybe_reexec(argv)
    cli.main(args=argv, prog_name="mlxlora")


if __name__ == "__main__":
    sys.exit(main())
