"""`faq-deploy eval`: perplexity of a model, a quantized checkpoint, or a model quantized on the fly."""

from __future__ import annotations

from typing import Any

import click

from faq_deploy.cli.options import emit, json_option, model_option, table
from faq_deploy.cli.quant_options import quant_options, quant_request
from faq_deploy.data import Calibration
from faq_deploy.jobs import run_eval
from faq_deploy.perplexity import WINDOW
from faq_deploy.quant import METHODS


@click.command("eval")
@model_option
@click.option("--quantize", "method", type=click.Choice(sorted(METHODS)), default=None,
              help="Quantize the model in memory first (fp when omitted).")
@quant_options
@click.option("--text", default="speeches-eval", show_default=True,
              help="speeches-eval, speeches-calib, bible-kjv, speeches:FIRST-LAST, bible-kjv:FIRST-LAST (books), "
                   "a .txt file or a folder of them.")
@click.option("--tokens", type=click.IntRange(min=2), default=20480, show_default=True,
              help="Token budget: the first N tokens of the text.")
@click.option("--ppl-window", type=click.IntRange(min=2), default=WINDOW, show_default=True,
              help="Non-overlapping window length; the first token of each is context only.")
@json_option
def eval_cmd(model_spec: str | None, method: str | None, text: str, tokens: int, ppl_window: int, as_json: bool,
             **options: Any) -> None:
    """Measure perplexity: the first --tokens tokens of --text in non-overlapping windows, the first
    token of each window context only, exp of the mean negative log-likelihood.

    --model takes a float model (optionally quantized in memory with --quantize), a checkpoint from
    `quantize`, or an exported graph: a bundle from `build` or any model folder with a
    genai_config.json (scored through onnxruntime, as a board runs it).

    \b
    Examples:
      faq-deploy eval                                   # float32 default model
      faq-deploy eval --quantize faq --bits 3 --group 64
      faq-deploy eval --model build/rtn-w4g32 --json    # a checkpoint from `quantize`
      faq-deploy eval --model build/jetson --text bible-kjv   # a bundle, on a second domain
    """
    config, calibration, budget = quant_request(method, options) if method else (None, Calibration(), None)
    result = run_eval(model_spec, config, calibration, text, tokens, ppl_window, budget)
    if as_json:
        emit(result, as_json=True)
        return
    row = vars(result)
    click.echo(table([row], ["model", "method", "bits", "group", "text", "tokens", "perplexity", "seconds"]))
