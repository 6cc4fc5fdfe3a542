"""`faq-deploy`: a thin noun-verb CLI; every command calls a library function.

One error boundary: a FaqDeployError prints its cause and next step and exits with its
documented code. FAQ_DEPLOY_DEBUG=1 re-raises it with the traceback instead.
"""

from __future__ import annotations

import importlib
import os

import click

from faq_deploy.errors import EXIT_CODES, FaqDeployError

_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in sorted(EXIT_CODES.items()))


# Command name → module:attribute. A command's module is imported when it runs, so the light ones
# (targets, inspect, verify) start in a fraction of a second instead of importing torch first.
_COMMANDS = {
    "models": "models:models", "text": "text:text", "quantize": "quantize:quantize_cmd",
    "eval": "evaluate:eval_cmd", "build": "build:build_cmd", "inspect": "bundle:inspect_cmd",
    "verify": "bundle:verify_cmd", "targets": "targets:targets", "push": "push:push_cmd",
    "status": "push:status_cmd", "rollback": "push:rollback_cmd", "gc": "push:gc_cmd", "logs": "push:logs_cmd",
    "trust": "push:trust_cmd", "run": "bundle:run_cmd",
}


class _Cli(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attribute = _COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"faq_deploy.cli.{module}"), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FaqDeployError as exc:
            if os.environ.get("FAQ_DEPLOY_DEBUG"):
                raise
            click.secho(f"error: {exc.cause}", err=True, fg="red")
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Cli, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="faq-deploy")
def cli() -> None:
    """Quantize a causal LM with Future-Aware Quantization and deploy it to edge boards.

    \b
    Start with the embedded default model (SmolLM2-135M-Instruct, fetched from PyPI):
      faq-deploy quantize --method rtn --bits 4 --group 32 --out build/rtn-w4g32
      faq-deploy eval --model build/rtn-w4g32 --tokens 4096
    """


def main() -> None:
    cli(prog_name="faq-deploy")
