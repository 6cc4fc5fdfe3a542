"""`faq-deploy quantize`: write a quantized checkpoint (olive layout) for export."""

from __future__ import annotations

import click

from faq_deploy.cli.options import emit, json_option, method_option, model_option, scheme_from, scheme_options
from faq_deploy.jobs import run_quantize
from faq_deploy.quant import make_config


@click.command("quantize")
@model_option
@method_option("rtn", "Quantization method.")
@scheme_options
@click.option("--out", required=True, metavar="DIR", help="Checkpoint folder to write (replaced if present).")
@json_option
def quantize_cmd(model_spec: str | None, method: str, bits: int, group_size: int, symmetric: bool,
                 out: str, as_json: bool) -> None:
    """Quantize a model's block Linears and write a pre-quantized checkpoint.

    The folder holds per-Linear qweight/scales/qzeros in onnxruntime's MatMulNBits layout
    ("olive" quant_method), which `faq-deploy eval --model DIR` and the export read.

    \b
    Example:
      faq-deploy quantize --method rtn --bits 3 --group 64 --out build/rtn-w3g64
    """
    config = make_config(method, scheme_from(bits, group_size, symmetric))
    emit(run_quantize(model_spec, config, out), as_json)
