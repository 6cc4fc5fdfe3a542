"""Export (onnxruntime-genai builder and torch.onnx dynamo) and bundles, on the real default model and real sessions."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
from commands import FAQ_DEPLOY, FAQ_RUN, TINY_FAQ
from conftest import Exports, remembered
from genai import genai_greedy, genai_logits
from onnx import TensorProto
from tiny_models import TINY, tiny_calibration, tiny_model

from faq_deploy import bundle, checkpoint, models
from faq_deploy.build import MIN_AGREEMENT
from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.errors import BundleInvalid, ExportError
from faq_deploy.export.codes import check_codes
from faq_deploy.export.dynamo import export_dynamo
from faq_deploy.export.graph import edited_graph, set_accuracy_levels, set_session_option
from faq_deploy.export.options import EXPORTERS, TABLE_KINDS, ExportOptions
from faq_deploy.export.parity import compare, compare_logits, onnx_logits
from faq_deploy.export.qdq import QDQ_ACCURACY_LEVEL, to_qdq
from faq_deploy.export.steps import export, finish
from faq_deploy.export.tables import fake_quantize_tables, quantize_tables
from faq_deploy.perplexity import WINDOW, perplexity
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.packing import MatMulNBitsWeights, from_matmulnbits
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime.bundle import MANIFEST
from faq_runtime.load import LoadOptions, load
from faq_runtime.model import THREADS_OPTION, Decoder

BOTH = pytest.mark.parametrize("exporter", EXPORTERS)
# 3-bit codes travel in the same 4-bit nodes whichever exporter placed them: the builder checks the
# packing of 3-bit codes, and each exporter its graph at 4 bits
EVERY_WIDTH = pytest.mark.parametrize("bits, exporter", [(4, e) for e in EXPORTERS] + [(3, "builder")])


@pytest.fixture(scope="module")
def eval_ids(real_cache: Path) -> torch.Tensor:
    return eval_tokens(models.load(None).tokenizer.backend_tokenizer, load_corpus("speeches-eval"), 2048)


@EVERY_WIDTH
def test_level_0_export_carries_our_codes_and_matches_torch(exports: Exports, bits: int, exporter: str,
                                                           eval_ids) -> None:
    loaded, result, _ = exports.quantized(bits, exporter)
    level0 = exports.level0(bits, exporter)
    assert check_codes(level0, result.weights) == 7 * loaded.model.config.num_hidden_layers
    first = eval_ids[:WINDOW]
    parity = compare(exports.logits(bits, exporter)(first), Decoder(level0), first)
    assert parity.max_rel_diff <= 1e-4 and parity.argmax_agreement == 1.0, parity


@pytest.mark.parametrize("bits", [4, 3])
def test_level_4_keeps_perplexity_within_one_percent(exports: Exports, bits: int, eval_ids, tmp_path: Path) -> None:
    """A build sets every node's level on the exported graph (faq_deploy.export.steps.finish), so the level-4
    graph here is the level-0 export with its levels set the same way. The whole model's, so the builder's:
    dynamo's level-4 graph is the dynamo build's (test_build_writes_a_verified_bundle), whose gate holds its
    next-token agreement to the same MIN_AGREEMENT. Both sides' logits of the first window serve the
    agreement and the perplexity; the torch side's are the level-0 test's."""
    _, result, _ = exports.quantized(bits)
    model_dir = shutil.copytree(exports.level0(bits, "builder"), tmp_path / "model")
    with edited_graph(model_dir) as edited:
        assert set_accuracy_levels(edited.graph, ExportOptions(accuracy_level=4)) == 0
    assert check_codes(model_dir, result.weights) == 210
    expected, actual = exports.logits(bits), remembered(onnx_logits(Decoder(model_dir)))
    first = eval_ids[:WINDOW]
    # int8 activations: 94.7-97% of next tokens agree on this model (see faq_deploy.build.MIN_AGREEMENT);
    # the perplexity below is the sharper check
    assert compare_logits(expected(first), actual(first)).argmax_agreement >= MIN_AGREEMENT
    reference = perplexity(expected, eval_ids).perplexity
    assert abs(perplexity(actual, eval_ids).perplexity / reference - 1) < 0.01


@pytest.mark.heavy
def test_five_bit_codes_export_as_two_nodes_that_compute_what_torch_computes(eval_ids, tmp_path: Path) -> None:
    """5-bit codes: the builder's node holds the low four bits, the build adds a 2-bit node beside it
    for the fifth; symmetric, neither node stores zero points."""
    loaded = models.load(None)
    result = quantize(loaded.model, make_config("rtn", QuantScheme(5, 32, symmetric=True)))
    folder = checkpoint.save(result, loaded.tokenizer, loaded.ref, tmp_path / "checkpoint")
    options = ExportOptions(accuracy_level=0, threads=1)
    model_dir = export(folder, tmp_path / "model", options)
    assert check_codes(model_dir, result.weights) == 210
    read = checkpoint.load(folder)
    assert all(torch.equal(read.weights[name].codes, w.codes) for name, w in result.weights.items())
    finish(model_dir, read, options, result.config.scheme)
    nodes = [n for n in onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    planes = [n for n in nodes if n.name.endswith("/plane/MatMulNBits")]
    assert len(planes) == len(nodes) - len(planes) - 1 >= 30 * 4  # every block node has one; the head none
    assert all(len(n.input) == 3 for n in nodes)
    assert Decoder(model_dir).spec.threads == 1  # the options' thread count, in genai_config
    parity = compare(read.model, Decoder(model_dir), eval_ids[:1000])
    assert parity.max_rel_diff <= 1e-4 and parity.argmax_agreement == 1.0, parity


def test_the_bundles_thread_count_reaches_both_runtimes(exports: Exports, tmp_path: Path) -> None:
    """A board's thread count travels in genai_config.json: faq_runtime's session takes it (an explicit
    count wins; never more than this process may run on) and onnxruntime-genai reads the same entry."""
    model_dir = shutil.copytree(exports.level0(4, "builder"), tmp_path / "model")

    def threads(asked: int | None = None) -> int:
        return Decoder(model_dir, threads=asked).session.get_session_options().intra_op_num_threads

    assert Decoder(model_dir).spec.threads is None
    set_session_option(model_dir, THREADS_OPTION, 1)
    assert threads() == 1 and threads(2) == 2
    og.Model(str(model_dir))  # genai knows the entry: an integer under a key it does not know is refused
    set_session_option(model_dir, THREADS_OPTION, 4096)  # (genai would start all 4096: minutes)
    assert threads() == len(os.sched_getaffinity(0))


@BOTH
def test_a_changed_code_is_caught(exports: Exports, exporter: str) -> None:
    _, result, _ = exports.quantized(4, exporter)
    model_dir = exports.level0(4, exporter)
    weights = dict(result.weights)
    name = "model.layers.3.mlp.up_proj"
    codes = weights[name].codes.clone()
    codes[0, 0] = (codes[0, 0] + 1) % 8
    weights[name] = type(weights[name])(codes, weights[name].scales, weights[name].zeros, weights[name].scheme)
    with pytest.raises(ExportError, match="layers.3.mlp.up_proj"):  # the builder's "/", dynamo's "."
        check_codes(model_dir, weights)
    with pytest.raises(ExportError, match="no MatMulNBits node"):
        check_codes(model_dir, {**result.weights, "model.layers.99.mlp.up_proj": weights[name]})


def _stored(graph: onnx.GraphProto, name: str) -> np.ndarray:
    """The initializer behind `name`, through the Reshape and Cast nodes onnxruntime folds at load."""
    made_by = {n.output[0]: n for n in graph.node}
    while name in made_by:
        assert made_by[name].op_type in ("Reshape", "Cast"), made_by[name]
        name = made_by[name].input[0]
    return onnx.numpy_helper.to_array(next(t for t in graph.initializer if t.name == name)).copy()


@BOTH
@pytest.mark.parametrize("lm_head, embedding",
                         [("int4", "int8"), ("float", "int4"), ("int8", "int8"), ("int8", "float")])
def test_quantized_tables_carry_our_codes_and_match_torch(exports: Exports, exporter: str, eval_ids, tmp_path: Path,
                                                          lm_head: str, embedding: str) -> None:
    loaded, _, _ = exports.quantized(4, exporter)
    model = copy.deepcopy(loaded.model)
    head, table = fake_quantize_tables(model, ExportOptions(lm_head=lm_head, embedding=embedding))
    folder = shutil.copytree(exports.level0(4, exporter), tmp_path / "model")
    with edited_graph(folder) as edited:
        quantize_tables(edited.graph, head, table)
    graph = onnx.load(str(folder / "model.onnx"))
    logits = next(n for n in graph.graph.node if n.output[0] == "logits")
    lookup = next(n for n in graph.graph.node if n.op_type.startswith("Gather") and "embed_tokens" in n.name)
    if table is None:  # a float lookup: the builder's reads the tied head's float weight through a Transpose
        transpose = next((n for n in graph.graph.node if n.output[0] == lookup.input[0]), None)
        values = (_stored(graph.graph, transpose.input[0]).T if transpose is not None
                  else _stored(graph.graph, lookup.input[0]))
        assert lookup.op_type == "Gather" and (transpose is None or transpose.op_type == "Transpose")
        np.testing.assert_array_equal(values, model.get_input_embeddings().weight.detach().numpy())
    else:
        # the tied table quantized alike for both is stored once: the lookup reads the head's arrays
        assert lookup.op_type == "GatherBlockQuantized"
        assert (lookup.input[2:] == logits.input[2:]) == (lm_head == embedding)
        bits = {a.name: a.i for a in lookup.attribute}["bits"]
        data, scales, zeros = (_stored(graph.graph, lookup.input[i]) for i in (0, 2, 3))
        stored = from_matmulnbits(MatMulNBitsWeights(data.reshape(data.shape[0], scales.shape[1], -1), scales,
                                                     zeros, k=table.shape[1], n=table.shape[0], bits=bits,
                                                     block_size=table.scheme.group_size), table.scheme)
        assert torch.equal(stored.codes, table.codes) and torch.equal(stored.zeros, table.zeros)
    ops = {n.op_type for n in graph.graph.node if n.output[0] == "logits"}
    assert ops == ({"MatMulNBits"} if head is not None else {"MatMul"})
    parity = compare(model, Decoder(folder), eval_ids[:256])  # the blocks' 1,024-token parity is the level-0 test's
    assert parity.max_rel_diff <= 1e-4 and parity.argmax_agreement == 1.0, parity


@BOTH
def test_cached_decoding_equals_one_full_pass(exports: Exports, exporter: str, eval_ids) -> None:
    """Prefill then token-by-token with the KV cache gives the logits of one full forward."""
    decoder = Decoder(exports.level0(4, exporter))
    ids = eval_ids[:48].numpy()[None]
    full = decoder.logits(ids[0].tolist())
    logits, cache = decoder.forward(ids[:, :32], decoder.empty_cache())
    steps = [logits[0]]
    for i in range(32, 48):
        logits, cache = decoder.forward(ids[:, i:i + 1], cache)
        steps.append(logits[0])
    assert np.abs(np.concatenate(steps) - full).max() <= 1e-4 * np.abs(full).max()


@BOTH
def test_the_qdq_rewrite_of_each_export_computes_what_its_matmulnbits_graph_computes(exports: Exports, exporter: str,
                                                                                   eval_ids, tmp_path: Path) -> None:
    level0 = exports.level0(4, exporter)
    folder = shutil.copytree(level0, tmp_path / "model")
    nodes = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(folder / "model.onnx")).graph.node)
    with edited_graph(folder) as edited:
        assert to_qdq(edited, str(folder)) == nodes > 0
    assert not any(n.op_type == "MatMulNBits" for n in onnx.load(str(folder / "model.onnx")).graph.node)
    ids = eval_ids[:256].tolist()
    expected = Decoder(level0).logits(ids)
    assert np.abs(Decoder(folder).logits(ids) - expected).max() > 1e-2 * np.abs(expected).max()  # level 4
    set_session_option(folder, QDQ_ACCURACY_LEVEL, "0")
    actual = Decoder(folder).logits(ids)
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.heavy
def test_a_tensorrt_bundle_carries_signed_qdq_weights_that_both_runtimes_run(real_cache: Path,
                                                                             tmp_path: Path) -> None:
    """`--weights qdq --symmetric`: every quantized weight, the int8 lm_head too, as DequantizeLinear of
    signed codes with no zero point (the form TensorRT takes) → MatMul. Where onnxruntime's CPU provider
    fuses them back, both runtimes take the accuracy level from genai_config.json: here 0, float."""
    out = tmp_path / "trt"
    done = subprocess.run([*FAQ_DEPLOY, "build", "--target", "jetson", "--method", "rtn", "--symmetric", "--weights",
                           "qdq", "--accuracy-level", "0", "--eval-tokens", "256", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert json.loads((out / MANIFEST).read_text())["export"]["weights"] == "qdq"
    assert result["parity"]["max_rel_diff"] <= 1e-4 and result["perplexity_bundle"] < 1.5 * result["perplexity_float"]
    genai = json.loads((out / "model" / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["session_options"][QDQ_ACCURACY_LEVEL] == "0"
    graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph
    init = {t.name: t.data_type for t in graph.initializer}
    made_by = {n.output[0]: n for n in graph.node}
    dequantized = [made_by[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in made_by]
    assert not any(n.op_type == "MatMulNBits" for n in graph.node)
    assert len(dequantized) == sum(n.op_type == "DequantizeLinear" for n in graph.node) > 100
    assert {(init[n.input[0]], len(n.input)) for n in dequantized} == {(TensorProto.INT4, 2), (TensorProto.INT8, 2)}
    assert made_by[made_by["logits"].input[1]].op_type == "DequantizeLinear"
    generator = load(out, LoadOptions(check_device=False, speculate=False))  # genai decodes a token a forward
    ids = generator.encode("My fellow citizens,")
    logits = generator.decoder.logits(ids)[-1]
    assert np.abs(genai_logits(out / "model", ids) - logits).max() <= 1e-4 * np.abs(logits).max()
    ours = list(generator.tokens(ids, 16))
    assert len(set(ours)) > 4 and ours == genai_greedy(out / "model", ids, 16)


@pytest.mark.heavy
def test_a_cuda_bundle_is_a_float16_graph_of_our_codes(real_cache: Path, tmp_path: Path) -> None:
    """`--provider cuda`: the builder's float16 graph for onnxruntime's CUDA provider, with our codes and
    float16 scales (the build compares them; at 3 bits few float32 scales would survive float16) and int8
    tables. No GPU here: onnxruntime's CPU provider runs it for parity and generation; the CUDA run is in
    docs/results/cuda.md."""
    out = tmp_path / "cuda"
    done = subprocess.run([*FAQ_DEPLOY, "build", "--target", "jetson", "--provider", "cuda", "--method", "rtn",
                           "--bits", "3", "--eval-tokens", "256", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["export"]["provider"] == "cuda"
    assert manifest["quantization"]["scheme"] == {"bits": 3, "group_size": 32, "symmetric": False,
                                                  "scale_dtype": "float16", "offsets": False}
    shown = subprocess.run([*FAQ_DEPLOY, "inspect", str(out)], capture_output=True, text=True).stdout
    assert "rtn w3 g32, float16 scales" in shown and "builder graph for cuda" in shown
    assert manifest["target"]["compatibility"]["providers"] == ["CUDA", "CPU"]
    # RTN at 3 bits costs this model about 2.1-2.2x perplexity (38.1 against 18.2 on 2,048 tokens)
    assert result["perplexity_bundle"] < 2.5 * result["perplexity_float"]
    genai = json.loads((out / "model" / "genai_config.json").read_text())["model"]["decoder"]
    assert "cuda" in genai["session_options"]["provider_options"][0]
    graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph
    assert {o.name: o.type.tensor_type.elem_type for o in graph.output}["logits"] == TensorProto.FLOAT16
    head = next(n for n in graph.node if n.output[0] == "logits")
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
    warnings: list[str] = []  # this host has no CUDA: the runtime passes over it to the CPU
    generator = load(out, LoadOptions(check_device=False), warnings.append)
    assert "CUDA" in warnings[0] and generator.decoder.session.get_providers() == ["CPUExecutionProvider"]
    ids = generator.encode("My fellow citizens,")
    tokens = list(generator.tokens(ids, 16))
    assert len(set(tokens)) > 4 and tokens == list(generator.tokens(ids, 16))


@pytest.fixture(scope="module", params=EXPORTERS)
def built(request: pytest.FixtureRequest, exports: Exports, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, dict]:
    """`faq-deploy build --target jetson` end to end with each exporter: the session's builder bundle, and
    the same build by torch.onnx (which keeps its lm_head at accuracy level 0) of the model the dynamo
    tests trace, the default model's first blocks."""
    if request.param == "builder":
        return request.getfixturevalue("jetson_bundle")
    folder = tmp_path_factory.mktemp("bundles")
    model = exports.blocks()
    out = folder / "jetson"
    done = subprocess.run([*FAQ_DEPLOY, "build", "--target", "jetson", "--model", str(model), "--exporter", "dynamo",
                           *TINY_FAQ,
                           "--eval-tokens", "1024", "--float-activations", "lm_head", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads(done.stdout)


def test_build_writes_a_verified_bundle(built: tuple[Path, dict]) -> None:
    out, result = built
    manifest = json.loads((out / MANIFEST).read_text())
    assert result["bundle_id"] == manifest["bundle_id"] and result["target"] == "jetson-orin-nano-8gb"
    assert result["peak_rss_bytes"].keys() == result["seconds"].keys()  # every stage's peak memory
    assert all(100e6 < peak < 16e9 for peak in result["peak_rss_bytes"].values())
    layers = json.loads((out / "model" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    assert manifest["quantization"]["method"] == "faq" and manifest["quantization"]["modules"] == 7 * layers
    assert manifest["quantization"]["calibration"]["samples"] == 2
    assert manifest["export"]["accuracy_level"] == 4 and manifest["export"]["exporter"] in EXPORTERS
    assert manifest["export"]["lm_head"] == manifest["export"]["embedding"] == "int8"
    graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False)
    head = next(n for n in graph.graph.node if n.output[0] == "logits")
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
    float_head = manifest["export"]["exporter"] == "dynamo"
    assert manifest["export"]["float_activations"] == (["lm_head"] if float_head else [])
    levels = {n.name: {a.name: a.i for a in n.attribute}["accuracy_level"]
              for n in graph.graph.node if n.op_type == "MatMulNBits"}
    assert levels.pop(head.name) == (0 if float_head else 4) and set(levels.values()) == {4}
    table = next(n for n in graph.graph.node if "input_ids" in n.input[1:2])
    assert table.op_type == "GatherBlockQuantized" and {a.name: a.i for a in table.attribute}["bits"] == 8
    # one 8-bit table for the tied pair; every scale stored in float16 and cast back at load
    made_by = {n.output[0]: n for n in graph.graph.node}
    assert made_by[table.input[0]].input[0] == head.input[1] and table.input[2:] == head.input[2:]
    stored = {t.name: t.data_type for t in graph.graph.initializer}
    scales = {n.input[2] for n in graph.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert {stored[made_by[name].input[0]] for name in scales} == {TensorProto.FLOAT16}
    assert {f["path"] for f in manifest["files"]} >= {"model/model.onnx", "model/model.onnx.data",
                                                      "model/genai_config.json", "model/tokenizer.json", "REPORT.md"}
    assert result["perplexity_bundle"] < 1.5 * result["perplexity_float"]
    assert result["bundle_bytes"] < result["float_bytes"] / 2
    assert result["decode_ceiling_tokens_s"] > 0
    assert "jetson-orin-nano-8gb" in (out / "REPORT.md").read_text()
    assert bundle.verify(out).id == result["bundle_id"]
    inspected = subprocess.run([*FAQ_DEPLOY, "inspect", str(out), "--json"], capture_output=True, text=True)
    assert json.loads(inspected.stdout)["bundle_id"] == result["bundle_id"]


def test_the_runtime_generates_from_the_bundle(built: tuple[Path, dict]) -> None:
    out, _ = built
    # a Jetson bundle on this x86 host: the device check would (rightly) refuse it
    args = [*FAQ_RUN, "generate", str(out), "--prompt", "The Congress shall", "--max-tokens", "12", "--no-stream",
            "--no-device-check"]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and first.stdout == subprocess.run(args, capture_output=True, text=True).stdout


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "model" / "tokenizer_config.json").write_text("{}"), "tokenizer_config.json"),
    (lambda b: (b / "model" / "genai_config.json").unlink(), "missing"),
    (lambda b: (b / "extra.txt").write_text("x"), "not in the manifest"),
    (lambda b: _edit_manifest(b, lambda m: m["files"][0].update(path="../outside")), "not a plain path"),
    (lambda b: _edit_manifest(b, lambda m: m.pop("target")), "'target' is missing"),
    (lambda b: _edit_manifest(b, lambda m: m.update(schema_version="1")), "must be int"),
])
def test_verify_refuses_a_damaged_bundle(jetson_bundle: tuple[Path, dict], tmp_path: Path, damage,
                                         message: str) -> None:
    copy = shutil.copytree(jetson_bundle[0], tmp_path / "b")
    damage(copy)
    with pytest.raises(BundleInvalid, match=message):
        bundle.verify(copy)
    cli = subprocess.run([*FAQ_DEPLOY, "verify", str(copy)], capture_output=True, text=True)
    assert cli.returncode == 12 and "error:" in cli.stderr
    assert subprocess.run([*FAQ_RUN, "verify", str(copy)], capture_output=True, text=True).returncode == 12


def _edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.heavy
@pytest.mark.parametrize("architecture", list(TINY))
def test_dynamo_exports_each_registered_layout(architecture: str, default_model, tmp_path: Path) -> None:
    """The fallback on tiny LLaMA, Mistral, Qwen2 (q/k/v bias: MatMulNBits then Add) and Qwen3 (q/k
    norms) models: every Linear carried as our codes, logits equal to the fake-quantized model's."""
    result = quantize(tiny_model(architecture), make_config("rtn", QuantScheme(4, 16)))
    folder = checkpoint.save(result, default_model.tokenizer, default_model.ref, tmp_path / "ckpt")
    model_dir = export_dynamo(folder, tmp_path / "model", ExportOptions(exporter="dynamo", accuracy_level=0))
    assert check_codes(model_dir, result.weights) == len(result.weights) == 7 * 3
    decoder = Decoder(model_dir)
    ids = tiny_calibration(1, 48)[0]
    parity = compare(result.model, decoder, ids)
    assert parity.max_rel_diff <= 1e-4 and parity.argmax_agreement == 1.0, parity
    # generation's path: a prompt, then one token at a time through the session-held cache
    full, cache = decoder.logits(ids.tolist()), decoder.new_cache(len(ids))
    stepped = [decoder.step(ids[:32].tolist(), cache)] + [decoder.step([int(t)], cache) for t in ids[32:]]
    assert np.abs(np.stack(stepped) - full[31:]).max() <= 1e-4 * np.abs(full).max()


@pytest.mark.heavy
def test_dynamo_writes_a_float16_graph_for_cuda(default_model, tmp_path: Path) -> None:
    """`--exporter dynamo --provider cuda`: the model traced in float16 (ops, cache, logits), our codes with
    float16 scales, CUDA provider options for onnxruntime-genai; onnxruntime's CPU provider runs it here."""
    scheme = QuantScheme(4, 16, scale_dtype="float16")
    result = quantize(tiny_model("LlamaForCausalLM"), make_config("rtn", scheme))
    folder = checkpoint.save(result, default_model.tokenizer, default_model.ref, tmp_path / "ckpt")
    model_dir = export_dynamo(folder, tmp_path / "model", ExportOptions(exporter="dynamo", provider="cuda",
                                                                        accuracy_level=0))
    assert check_codes(model_dir, result.weights) == 21
    genai = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["session_options"]["provider_options"] == [{"cuda": {}}]
    decoder = Decoder(model_dir)
    assert decoder.kv_dtype == decoder.logits_dtype == np.float16
    parity = compare(result.model, decoder, tiny_calibration(1, 48)[0])
    assert parity.max_rel_diff <= 5e-3 and parity.argmax_agreement == 1.0, parity  # float16: 7e-4 measured


@pytest.mark.heavy
def test_float_activations_keep_the_named_nodes_at_level_0(default_model, tmp_path: Path) -> None:
    """In a level-4 graph of 8-bit blocks with an int8 lm_head, `lm_head` sets only the head to level 0
    and `8bit` every node, which makes the graph exact again (level 4 quantizes activations to int8)."""
    result = quantize(tiny_model("LlamaForCausalLM"), make_config("rtn", QuantScheme(8, 16)))
    head, _ = fake_quantize_tables(result.model, ExportOptions(embedding="float"))
    folder = checkpoint.save(result, default_model.tokenizer, default_model.ref, tmp_path / "ckpt")
    model_dir = export_dynamo(folder, tmp_path / "model", ExportOptions(exporter="dynamo"))
    with edited_graph(model_dir) as edited:
        quantize_tables(edited.graph, head, None)
    ids = tiny_calibration(1, 48)[0]

    def run(*float_activations: str) -> tuple[dict[str, int], float]:
        options = ExportOptions(exporter="dynamo", float_activations=float_activations)
        with edited_graph(model_dir) as edited:
            float_nodes = set_accuracy_levels(edited.graph, options)
            levels = {n.name: a.i for n in edited.graph.node if n.op_type == "MatMulNBits"
                      for a in n.attribute if a.name == "accuracy_level"}
        assert float_nodes == sum(level == 0 for level in levels.values())
        return levels, compare(result.model, Decoder(model_dir), ids).max_rel_diff

    levels, int8_diff = run()
    assert len(levels) == 7 * 3 + 1 and set(levels.values()) == {4} and int8_diff > 1e-3
    levels, _ = run("lm_head")
    assert {name for name, level in levels.items() if level == 0} == {"/lm_head/MatMulNBits"}
    levels, diff = run("8bit")
    assert set(levels.values()) == {0} and diff <= 1e-4


def test_an_auto_embedding_is_stored_as_the_tied_head_is_and_as_int4_when_untied() -> None:
    untied = tiny_model("Qwen2ForCausalLM")
    assert untied.get_input_embeddings().weight is not untied.get_output_embeddings().weight
    tied = tiny_model("Qwen2ForCausalLM")
    tied.get_output_embeddings().weight = tied.get_input_embeddings().weight
    for head in TABLE_KINDS:
        assert ExportOptions(lm_head=head, embedding="auto").for_model(untied).embedding == "int4"
        assert ExportOptions(lm_head=head, embedding="auto").for_model(tied).embedding == head
    assert ExportOptions(embedding="float").for_model(untied).embedding == "float"  # a choice is kept
