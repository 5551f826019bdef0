"""The `mlxlora` command line: the Click group; every command lives in mlxlora/commands/.

Options default to None ("not given"), so the dataclasses in config.py stay the only home of
defaults and a --config file can fill what the command line leaves out.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import MlxloraError


class _Group(click.Group):
    """Turns every MlxloraError into a one-line `Error: ...` and exit code 1 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxloraError as e:
            raise click.ClickException(str(e)) from None


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
