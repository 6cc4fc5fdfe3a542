"""`faq-deploy quantize`: write a quantized checkpoint (olive layout) for export."""

from __future__ import annotations

from typing import Any

import click

from faq_deploy.cli.options import emit, json_option, model_option
from faq_deploy.cli.quant_options import METHOD_HELP, method_option, quant_options, quant_request
from faq_deploy.jobs import run_quantize


@click.command("quantize")
@model_option
@method_option("faq", METHOD_HELP)
@quant_options
@click.option("--out", required=True, metavar="DIR", help="Checkpoint folder to write (replaced if present).")
@json_option
def quantize_cmd(model_spec: str | None, method: str, out: str, as_json: bool, **options: Any) -> None:
    """Quantize a model's block Linears and write a pre-quantized checkpoint.

    The folder holds per-Linear qweight/scales/qzeros in onnxruntime's MatMulNBits layout
    ("olive" quant_method), which `faq-deploy eval --model DIR` and the export read. awq and faq
    calibrate on --calib; rtn needs no calibration.

    \b
    Examples:
      faq-deploy quantize --out build/faq-w4g32                  # FAQ, 4 bits, group 32
      faq-deploy quantize --method awq --bits 3 --group 64 --out build/awq-w3g64
      faq-deploy quantize --method rtn --bits 8 --out build/rtn-w8
    """
    config, calibration, budget = quant_request(method, options)
    emit(run_quantize(model_spec, config, calibration, out, budget), as_json)
