"""`faq-deploy eval`: perplexity of a model, a quantized checkpoint, or a model quantized on the fly."""

from __future__ import annotations

import click

from faq_deploy.cli.options import emit, json_option, model_option, scheme_from, scheme_options, table
from faq_deploy.jobs import run_eval
from faq_deploy.quant import METHODS, make_config


@click.command("eval")
@model_option
@click.option("--quantize", "method", type=click.Choice(sorted(METHODS)), default=None,
              help="Quantize the model in memory first (fp when omitted).")
@scheme_options
@click.option("--text", default="speeches-eval", show_default=True,
              help="speeches-eval, speeches-calib, speeches:FIRST-LAST, a .txt file or a folder of them.")
@click.option("--tokens", type=click.IntRange(min=2), default=20480, show_default=True,
              help="Token budget: the first N tokens of the text.")
@click.option("--window", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Non-overlapping window length; the first token of each is context only.")
@json_option
def eval_cmd(model_spec: str | None, method: str | None, bits: int, group_size: int, symmetric: bool,
             text: str, tokens: int, window: int, as_json: bool) -> None:
    """Measure perplexity (MEASURE.md protocol).

    \b
    Examples:
      faq-deploy eval                                   # float32 default model
      faq-deploy eval --quantize rtn --bits 4 --group 32
      faq-deploy eval --model build/rtn-w4g32 --json    # a checkpoint from `quantize`
    """
    config = make_config(method, scheme_from(bits, group_size, symmetric)) if method else None
    result = run_eval(model_spec, config, text, tokens, window)
    if as_json:
        emit(result, as_json=True)
        return
    row = vars(result)
    click.echo(table([row], ["model", "method", "bits", "group", "text", "tokens", "perplexity", "seconds"]))
