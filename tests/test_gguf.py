"""GGUF in, exactly: each block type's codes, the offsets beside MatMulNBits in real onnxruntime
sessions, and the default model built from its own GGUF file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from commands import FAQ_DEPLOY
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from onnx import TensorProto, numpy_helper
from tiny_models import tiny_model

from faq_deploy import checkpoint, models
from faq_deploy.cli import cli
from faq_deploy.data import Calibration, eval_tokens, load_corpus
from faq_deploy.export.codes import check_codes
from faq_deploy.export.graph import drop_default_zero_points, store_scales_in_float16
from faq_deploy.export.offsets import add_offsets
from faq_deploy.export.options import ExportOptions
from faq_deploy.export.parity import compare
from faq_deploy.export.planes import add_planes
from faq_deploy.export.steps import export, finish
from faq_deploy.jobs import quantize_loaded
from faq_deploy.quant import make_config
from faq_deploy.quant.gguf import FORMS, GgufFile, rounded_twice, to_codes, widened
from faq_deploy.quant.gguf_index import GgufIndex
from faq_deploy.quant.packing import from_matmulnbits, to_matmulnbits
from faq_deploy.quant.quantizer import QuantizedWeight
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime.files import sha256_file
from faq_runtime.model import Decoder

# gguf-py quantizes these itself; the K-quants it only reads
QUANTIZABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
WITH_MINIMUM = {T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K}
EVERY_TYPE = pytest.mark.parametrize("qtype", list(FORMS), ids=lambda t: t.name)
N, K = 24, 512


def synthetic(qtype: T, n: int = N, k: int = K, seed: int = 0) -> np.ndarray:
    """A weight [n, k] in `qtype`'s raw blocks: packed by the gguf package's own quantizer where it has
    one; for the K-quants, random blocks with finite float16 headers (any other byte is a valid code,
    scale or minimum)."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // block_weights, block_bytes), dtype=np.uint8)
    for field in ((208,) if qtype == T.Q6_K else (0, 2)):  # d (and dmin)
        blocks[:, field:field + 2] = (rng.random((len(blocks), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


@EVERY_TYPE
def test_each_block_type_becomes_codes_that_dequantize_to_llama_cpps_values_exactly(qtype: T) -> None:
    raw = synthetic(qtype)
    weight = to_codes(raw, qtype, (N, K))
    form = FORMS[qtype]
    np.testing.assert_array_equal(weight.dequantize().numpy(), gguf.quants.dequantize(raw, qtype))
    assert weight.scheme.bits == form.bits and weight.scheme.group_size == form.group
    assert int(weight.codes.max()) <= weight.scheme.max_code
    assert weight.scheme.offsets == (weight.offsets is not None) == (qtype in WITH_MINIMUM)
    # codes sit around the container's middle, MatMulNBits' default zero point (what level 4's int8
    # activations need, and the graph then stores no zero points): every group of a type without a
    # minimum; with one, wherever the shifted offset is a float32, most groups even of random K-quant blocks
    middle = 1 << (form.bits - 1)
    assert torch.all((weight.zeros == middle) | (weight.zeros == middle - form.zero))
    assert (weight.zeros == middle).float().mean() > (0.5 if qtype in WITH_MINIMUM else 0.999)
    assert weight.scheme.symmetric == bool(torch.all(weight.zeros == middle))
    back = from_matmulnbits(to_matmulnbits(weight), weight.scheme)
    for part in ("codes", "scales", "zeros", "offsets"):
        a, b = getattr(back, part), getattr(weight, part)
        assert (a is None and b is None) or torch.equal(a, b), part


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_a_weight_widened_to_8_bits_and_finer_groups_for_a_packed_node_keeps_its_values(qtype: T) -> None:
    weight = to_codes(synthetic(qtype), qtype, (N, K))
    wide = widened(weight, 16)
    assert (wide.scheme.bits, wide.scheme.group_size, wide.scheme.symmetric) == (8, 16, weight.scheme.symmetric)
    assert torch.equal(wide.dequantize(), weight.dequantize())
    assert torch.equal(from_matmulnbits(to_matmulnbits(wide), wide.scheme).dequantize(), weight.dequantize())


def test_a_table_rounded_two_ways_is_recognised_and_two_different_tables_are_not() -> None:
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    fine, coarse = (to_codes(gguf.quants.quantize(table, t), t, table.shape) for t in (T.Q8_0, T.Q5_0))
    other = to_codes(gguf.quants.quantize(np.roll(table, 1, axis=0), T.Q8_0), T.Q8_0, table.shape)
    assert rounded_twice(fine, coarse) and rounded_twice(coarse, fine)
    assert not rounded_twice(fine, other) and not rounded_twice(fine, fine)  # the same codes: one table


def test_the_index_finds_what_gguf_py_reads_and_refuses_a_cut_file(tmp_path: Path) -> None:
    """Every kind of key before the tensors (arrays of strings, of numbers and of arrays are stepped over)
    and a 64-byte alignment: the tensors' names, types, shapes and bytes are gguf-py's own."""
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_bool("flag", True)
    writer.add_array("tokens", ["a", "é", "", "long " * 40])
    writer.add_array("scores", [0.5, -1.0, 2.0])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_float64("ratio", 0.25)
    writer.add_string("name", "small")
    tensors = {"q4": (synthetic(T.Q4_0), T.Q4_0), "k6": (synthetic(T.Q6_K, k=256), T.Q6_K),
               "norm": (np.arange(7, dtype=np.float32), T.F32)}
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    index, reader = GgufIndex(path), gguf.GGUFReader(path)
    assert (index.fields["general.architecture"], index.fields["general.alignment"]) == ("llama", 64)
    assert (index.fields["flag"], index.fields["ratio"], index.fields["name"]) == (True, 0.25, "small")
    assert list(index.tensors) == [t.name for t in reader.tensors] == list(tensors)
    for theirs in reader.tensors:
        ours = index.tensors[theirs.name]
        assert (ours.tensor_type, ours.shape) == (theirs.tensor_type, tuple(int(d) for d in theirs.shape))
        assert ours.data.tobytes() == np.asarray(theirs.data).tobytes() == tensors[theirs.name][0].tobytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="ends at byte 200"):
        GgufIndex(cut)


def _matmul_graph(weights: dict[str, QuantizedWeight], rank: int) -> onnx.ModelProto:
    """One MatMulNBits node per weight (named as the dynamo exporter names them), all reading input A."""
    k = next(iter(weights.values())).shape[1]
    shape = ["batch", "seq", k][-rank:]
    nodes, inits, outputs = [], [], []
    for name, weight in weights.items():
        packed = to_matmulnbits(weight)
        parts = [f"{name}.{p}" for p in ("B", "scales", "zero_points")]
        arrays = (packed.b, packed.scales, packed.zero_points)
        inits += [numpy_helper.from_array(a, p) for a, p in zip(arrays, parts, strict=True)]
        nodes.append(onnx.helper.make_node("MatMulNBits", ["A", *parts], [f"{name}.Y"], name=f"{name}/MatMulNBits",
                                           domain="com.microsoft", K=k, N=packed.n, bits=packed.bits,
                                           block_size=packed.block_size, accuracy_level=0))
        outputs.append(onnx.helper.make_tensor_value_info(f"{name}.Y", TensorProto.FLOAT, None))
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("A", TensorProto.FLOAT, shape)],
                                   outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                        onnx.helper.make_opsetid("com.microsoft", 1)])


@EVERY_TYPE
@pytest.mark.parametrize("rank", [2, 3])
def test_matmulnbits_with_the_offsets_beside_it_computes_the_gguf_weights_product(qtype: T, rank: int) -> None:
    weights = {f"w{i}": to_codes(synthetic(qtype, seed=i), qtype, (N, K)) for i in range(2)}
    model = _matmul_graph(weights, rank)
    added = add_offsets(model.graph, weights)
    assert added == (2 if qtype in WITH_MINIMUM else 0)
    # two nodes on one input share one set of group sums
    assert sum(n.name.endswith("group_sums_16/MatMul") or n.name.endswith("group_sums_32/MatMul")
               for n in model.graph.node) == (1 if added else 0)
    # 5-bit codes: the fifth bits in a 2-bit node beside each
    assert add_planes(model.graph, weights) == (2 if FORMS[qtype].bits == 5 else 0)
    # zero points all at the default are not stored, and the nodes compute the same without them
    packed = {name: to_matmulnbits(w) for name, w in weights.items()}
    dropped = drop_default_zero_points(model.graph)
    kept = sum(len(n.input) > 3 for n in model.graph.node if n.op_type == "MatMulNBits")
    assert kept == sum((1 + (p.plane is not None)) * (not weights[name].scheme.symmetric) for name, p in packed.items())
    assert dropped == sum(p.zero_points.nbytes + (0 if p.plane is None else p.plane.zero_points.nbytes)
                          for name, p in packed.items() if weights[name].scheme.symmetric)
    store_scales_in_float16(model.graph)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((2, 3, K)[-rank:]).astype(np.float32)
    for name, got in zip([o.name for o in session.get_outputs()], session.run(None, {"A": a}), strict=True):
        w = weights[name.removesuffix(".Y")].dequantize().double().numpy()
        want = a.astype(np.float64) @ w.T
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name


def test_gguf_needs_a_gguf_model_and_keeps_the_files_widths(tmp_path: Path, real_cache: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_model("LlamaForCausalLM").save_pretrained(folder)
    models.load(None).tokenizer.save_pretrained(folder)  # a float model folder, not a GGUF
    result = CliRunner().invoke(cli, ["quantize", "--model", str(folder), "--method", "gguf",
                                      "--out", str(tmp_path / "q")])
    assert result.exit_code == 5 and "--method gguf needs a GGUF model" in result.output, result.output
    result = CliRunner().invoke(cli, ["quantize", "--method", "gguf", "--budget", "100", "--out", str(tmp_path / "q")])
    assert result.exit_code == 5 and "drop --budget" in result.output, result.output
    result = CliRunner().invoke(cli, ["quantize", "--method", "rtn", "--five-bit", "8bit",
                                      "--out", str(tmp_path / "q")])
    assert result.exit_code == 5 and "rtn does not take five_bit" in result.output, result.output


@pytest.mark.heavy
def test_the_default_model_from_its_own_gguf_matches_the_float_model_at_level_0(real_cache: Path,
                                                                                tmp_path: Path) -> None:
    """Every Linear of the embedded SmolLM2 file is Q4_1 and its tied table Q8_0: carried over, the
    level-0 graph computes what the float model (transformers' dequantization of that file) computes."""
    loaded = models.load(None)
    quantized = quantize_loaded(loaded, make_config("gguf", QuantScheme()), Calibration("speeches-calib", 1, 16, 0))
    assert len(quantized.weights) == 210 and all(w.scheme.offsets for w in quantized.weights.values())
    assert set(quantized.tables) == {"lm_head", "model.embed_tokens"}
    folder = checkpoint.save(quantized, loaded.tokenizer, loaded.ref, tmp_path / "checkpoint")
    read = checkpoint.load(folder)
    for name, weight in quantized.weights.items():
        assert torch.equal(read.weights[name].offsets, weight.offsets), name
    options = ExportOptions(accuracy_level=0)
    model_dir = export(folder, tmp_path / "model", options)
    assert check_codes(model_dir, quantized.weights) == 210
    finish(model_dir, read, options, QuantScheme(scale_dtype="float16"))

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    head = next(n for n in graph.node if n.output[0] == "logits")
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert head.op_type == "MatMulNBits" and lookup.input[2:] == head.input[2:]  # the file's table, stored once
    # every code, Q8_0's and the centred Q4_1's, sits at the default zero point: none are stored
    assert all(len(n.input) == 3 for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    table = GgufFile(loaded.ref.gguf, loaded.model).codes("model.embed_tokens")
    init = {t.name: t for t in graph.initializer}
    stored = numpy_helper.to_array(init[head.input[1]], str(model_dir))
    assert np.array_equal(stored.reshape(-1), to_matmulnbits(table).b.reshape(-1))
    # every block node has its offsets beside it; the head (Q8_0) has none
    blocks = sum(n.op_type == "MatMulNBits" for n in graph.node) - 1
    assert blocks >= 30 * 4 and sum(n.name.endswith("/offsets/MatMul") for n in graph.node) == blocks

    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus("speeches-eval"), 1000)
    parity = compare(models.load(None).model, Decoder(model_dir), ids)
    assert parity.max_rel_diff <= 1e-4 and parity.argmax_agreement == 1.0, parity


def rewritten(source: Path, out: Path, changes: dict[str, tuple[str, T]]) -> Path:
    """`source` written again with `changes`: tensor name → (the tensor whose values it takes, its new
    type), each re-quantized by the gguf package from the dequantized values."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name != gguf.Keys.General.ARCHITECTURE and not field.name.startswith("GGUF."):
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = {t.name: (t.data, t.tensor_type) for t in reader.tensors}
    for name, (origin, qtype) in changes.items():
        values = gguf.quants.dequantize(*tensors[origin])
        tensors[name] = (values if qtype == T.F32 else gguf.quants.quantize(values, qtype), qtype)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array, _ in tensors.values():
        writer.write_tensor_data(array)
    writer.close()
    return out


@pytest.mark.heavy
def test_a_build_says_which_tensors_left_the_files_codes_and_why(real_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model's file with one block weight in float32 (no exact form) and its table held
    twice, as Qwen2.5's files hold theirs (the head Q8_0, the lookup Q5_0): the float weight is
    re-quantized by RTN, the finer table serves both uses, and the summary, REPORT.md and the
    manifest say so. The file's float copy, made by the build in an empty cache, is the embedded
    model's float model wherever the file was not rewritten."""
    embedded = models.load(None).model.state_dict()
    source = models.fetch_embedded()
    file = rewritten(source, tmp_path / "rewritten.gguf", {
        "blk.0.ffn_down.weight": ("blk.0.ffn_down.weight", T.F32),
        "output.weight": ("token_embd.weight", T.Q8_0), "token_embd.weight": ("token_embd.weight", T.Q5_0)})
    cache = tmp_path / "cache"  # the file's float copy goes here, not into the user's cache
    cache.mkdir()
    (cache / "text").symlink_to(real_cache / "text")
    out = tmp_path / "bundle"
    done = subprocess.run([*FAQ_DEPLOY, "build", "--model", str(file), "--method", "gguf", "--target", "x86",
                           "--eval-tokens", "256", "--out", str(out), "--json"],
                          capture_output=True, text=True, env={**os.environ, "FAQ_DEPLOY_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    fallback = "blk.0.ffn_down.weight is F32, which has no exact MatMulNBits form"
    notes = [f"model.layers.0.mlp.down_proj: {fallback}; re-quantized by RTN w4 g32",
             "model.embed_tokens: the file holds the vocabulary table twice, rounded two ways; the finer copy "
             "(lm_head's) serves both and is stored once"]
    assert json.loads(done.stdout)["notes"] == notes
    assert all(f"note: {note}" in done.stderr for note in notes)
    assert all(f"- {note}" in (out / "REPORT.md").read_text() for note in notes)
    quantization = json.loads((out / "manifest.json").read_text())["quantization"]
    assert quantization["fallbacks"] == {"model.layers.0.mlp.down_proj": fallback}
    assert quantization["shared_table"] == "lm_head"
    # the float weight took the method's RTN scheme; its neighbours keep the file's Q4_1 (with offsets)
    assert "model.layers.0.mlp.down_proj" not in quantization["overrides"]
    assert quantization["overrides"]["model.layers.1.mlp.down_proj"]["offsets"]
    graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph
    head = next(n for n in graph.node if n.output[0] == "logits")
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    rows = next(n for n in graph.node if n.output[0] == lookup.input[0])  # the head's codes, reshaped
    assert rows.input[0] == head.input[1] and lookup.input[2:] == head.input[2:]

    monkeypatch.setenv("FAQ_DEPLOY_CACHE", str(cache))
    ref = models.resolve(str(file))  # the build's conversion, found in its cache
    assert ref.kind == "gguf" and ref.sha256 == sha256_file(file) and Path(ref.path).is_relative_to(cache)
    config = json.loads((Path(ref.path) / "config.json").read_text())
    assert "quantization_config" not in config  # a leftover GGUF config breaks saving and readers
    converted = models.load(str(file)).model.state_dict()
    tables = {"model.embed_tokens.weight", "lm_head.weight"}  # rewritten: Q5_0 and Q8_0 from the Q8_0 table
    assert converted.keys() == embedded.keys() and tables <= embedded.keys()
    assert all(torch.equal(converted[k], embedded[k]) for k in embedded.keys() - tables)
    assert not torch.equal(converted["model.embed_tokens.weight"], embedded["model.embed_tokens.weight"])
