"""`faq-deploy build`: quantize, export and pack a bundle for a target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from faq_deploy.build import default_out, run_build, summary
from faq_deploy.cli.options import emit, json_option, load_targets, model_option, targets_dir_option
from faq_deploy.cli.quant_options import METHOD_HELP, method_option, quant_options, quant_request
from faq_deploy.export.options import (
    EMBEDDING_KINDS,
    EXPORTERS,
    FLOAT_ACTIVATION_NODES,
    PROVIDERS,
    TABLE_KINDS,
    WEIGHT_FORMATS,
    ExportOptions,
)


@click.command("build")
@click.option("--target", "target_name", default=None, metavar="NAME",
              help="Board name or alias (jetson, x86, …) [default: generic-x86_64].")
@model_option
@method_option("faq", METHOD_HELP)
@quant_options
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Bundle folder to write (replaced when the build succeeds) [default: build/<model>-<target>].")
@click.option("--exporter", type=click.Choice(EXPORTERS), default=None,
              help="builder: onnxruntime-genai's fused graph; dynamo: torch.onnx (opset 23) for architectures the "
                   "builder does not know (about 1.5 min for the default model) "
                   "[default: the target's].")
@click.option("--provider", type=click.Choice(PROVIDERS), default=None,
              help="The execution provider the graph is made for: cpu (float32, int8 activations at "
                   "accuracy level 4) or cuda (float16: on an H100 it agreed with the torch model on 99.4% of next "
                   "tokens; onnxruntime's CPU provider runs it too) [default: cuda when the target prefers CUDA].")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits activations: 4 = int8 (fast on CPU), 0 = float32 [default: the target's].")
@click.option("--float-activations", type=click.Choice(FLOAT_ACTIVATION_NODES), multiple=True,
              help="Keep these MatMulNBits nodes at accuracy level 0 (float activations) in a level-4 graph; "
                   "repeatable. On the default model the int8 lm_head at level 0 agrees with float activations "
                   "on 97% of next tokens instead of 96%, but decodes at 7 tokens/s instead of 166 on a 2-core "
                   "x86 host (8-bit nodes have no fast float kernel) [default: the target's, none for the shipped "
                   "boards].")
@click.option("--lm-head", type=click.Choice(TABLE_KINDS), default=ExportOptions.lm_head, show_default=True,
              help="The output projection: int8 or int4 (our RTN, blocks of 64 and 32; the largest weight a decode "
                   "step reads, 113 → 29.6 MB at int8 on the default model) or float.")
@click.option("--embedding", type=click.Choice(EMBEDDING_KINDS), default="auto", show_default=True,
              help="The token embedding table: int8 or int4 (GatherBlockQuantized, blocks of 64 and 32) or float; "
                   "auto: as the lm_head when the two are tied (one table serves both), int4 when untied (on "
                   "Qwen2.5-Coder-0.5B 70 MB less than int8 for 0.08% perplexity on held-out text).")
@click.option("--weights", type=click.Choice(WEIGHT_FORMATS), default=None,
              help="matmulnbits: onnxruntime's fused 4-bit kernel (CPU, CUDA); qdq: DequantizeLinear → MatMul over "
                   "the same codes, for TensorRT, which runs no MatMulNBits (it takes symmetric codes only: add "
                   "--symmetric) [default: qdq when the target prefers TensorRT].")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Held-out tokens (speeches-eval) for perplexity before and after (parity always uses 1,024).")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Context length the memory fit and speed ceiling assume [default: the target's].")
@click.option("--force", is_flag=True,
              help="Build even if the bundle does not fit the target's memory (the device still checks at load).")
@click.option("--wheelhouse", is_flag=True,
              help="Add wheels/: faq-runtime and its dependencies for the target's platform and Python, so the "
                   "board installs offline (pip install --no-index --find-links wheels faq-runtime).")
@click.option("--emulated-parity", is_flag=True,
              help="Also measure parity and perplexity on the target's CPU architecture, in an arm64 userland "
                   "emulated by qemu-user (its int8 kernels round unlike x86's), and record them in the manifest "
                   "and REPORT.md; the build's gate stays this machine's figure. Needs --wheelhouse, root, "
                   "qemu-user-static, binfmt-support and debootstrap; a few minutes (the first run makes the "
                   "arm64 root, about 5 more).")
@click.option("--tar", is_flag=True, help="Also write <out>.tar of the bundle.")
@targets_dir_option
@json_option
def build_cmd(target_name: str | None, model_spec: str | None, method: str, out: Path | None,
              exporter: str | None, provider: str | None, accuracy_level: int | None,
              float_activations: tuple[str, ...], lm_head: str, embedding: str, weights: str | None,
              eval_tokens: int, context: int | None, force: bool, wheelhouse: bool, emulated_parity: bool, tar: bool,
              targets_dirs: tuple[Path, ...], as_json: bool, **options: Any) -> None:
    """Quantize, export to ONNX and pack a verified bundle for a board.

    The target (`faq-deploy targets list`) gives the defaults (bits, group, accuracy level, context)
    and the checks: providers and onnxruntime line, memory fit, decode-speed ceiling. They run on an
    estimate right after loading, so a build that cannot work stops in seconds.

    Stages: load → calibrate and quantize → export with the onnxruntime-genai builder or torch.onnx
    (our integer codes are read back and compared) → embedding and lm_head tables, accuracy levels,
    float16 scales → parity with the quantized torch model → perplexity of the exported graph → bundle
    (model/, manifest.json, REPORT.md). Nothing is written at --out unless every stage passes.

    \b
    Examples:
      faq-deploy build --target jetson
      faq-deploy build --target x86 --method awq --bits 3 --group 64 --out build/awq-w3
    """
    target = load_targets(targets_dirs).resolve(target_name)
    config, calibration, budget = quant_request(method, options, (target.build.bits, target.build.group))
    export = ExportOptions.for_target(target, exporter=exporter, provider=provider, accuracy_level=accuracy_level,
                                      weights=weights, float_activations=float_activations, lm_head=lm_head,
                                      embedding=embedding)
    out = out or default_out(model_spec, target)
    result = run_build(model_spec, config, calibration, target, out, export, eval_tokens,
                       context or target.build.context, force=force, wheels=wheelhouse, tar=tar, budget_bytes=budget,
                       emulated_parity=emulated_parity)
    if as_json:
        emit(result, as_json=True)
        return
    for line in summary(result, target):
        click.echo(line)
