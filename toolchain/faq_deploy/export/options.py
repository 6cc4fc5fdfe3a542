"""What an export makes: the graph's tables, widths and activation levels, chosen per build.

`ExportOptions` carries every choice the exporters and the graph edits read; `for_target` resolves
what the user left open from the board's registry entry, and `for_model` from the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from faq_deploy.errors import ExportError
from faq_deploy.quant.scheme import QuantScheme
from faq_deploy.registry import Target

# The float nodes both exporters write for the two vocabulary tables.
LM_HEAD_NODE = "/lm_head/MatMul"
EMBEDDING_NODE = "/model/embed_tokens/Gather"
# The lm_head and the embedding table are each stored float or as our RTN at 8 bits in blocks of 64 or
# 4 bits in blocks of 32: the head as MatMulNBits (the largest weight a decode step reads: 113 of 184 MB
# on the default model, float; 29.6 MB at 8 bits), the table as GatherBlockQuantized (only the rows of
# the prompt are read, but the whole table is resident). onnxruntime 1.23.0, the floor, runs both at
# both widths. 8-bit blocks of 64 instead of 32 save 1.3 MB of scales and zero points on the default
# model at no measured cost (held-out perplexity +0.08% on the speeches, −0.14% on the New Testament;
# docs/results/tables.md); blocks of 128 would pad its 576-wide rows to 640 and cost bytes. A float16
# (CUDA) graph keeps 8-bit blocks of 32 (ExportOptions.table_scheme): there blocks of 64 took the RTN w3
# build's next-token agreement from 95.3% to 93.0%, the build's floor.
TABLE_SCHEMES = {"int8": QuantScheme(8, 64), "int4": QuantScheme(4, 32)}
TABLE_KINDS = ("float", *TABLE_SCHEMES)
# "auto": decided by the model (ExportOptions.for_model)
EMBEDDING_KINDS = ("auto", *TABLE_KINDS)
PROVIDERS = ("cpu", "cuda")
# builder: onnxruntime-genai's fused graph (the default); dynamo: torch.onnx, for what the builder lacks
EXPORTERS = ("builder", "dynamo")
# matmulnbits: onnxruntime's fused kernel; qdq: DequantizeLinear → MatMul, for TensorRT (faq_deploy.export.qdq)
WEIGHT_FORMATS = ("matmulnbits", "qdq")
# Nodes that `float_activations` can keep at accuracy level 0 (float activations) under a level-4 graph.
# Measured on the default model (RTN w4 g32, int8 head, 2 x86 cores; docs/results/levels.md): the int8
# head at level 0 lifts next-token agreement with the torch model from 96.0% to 97.2% and cuts decoding
# from 166 to 7 tokens/s (8-bit MatMulNBits has no fast float-activation kernel on CPU): opt-in only.
FLOAT_ACTIVATION_NODES = ("lm_head", "8bit")


@dataclass(frozen=True)
class ExportOptions:
    exporter: str = "builder"  # one of EXPORTERS
    provider: str = "cpu"
    accuracy_level: int = 4  # 4: int8 activations, the fast CPU path; 0: float activations
    lm_head: str = "int8"    # one of TABLE_KINDS
    embedding: str = "int8"  # one of EMBEDDING_KINDS
    weights: str = "matmulnbits"  # one of WEIGHT_FORMATS
    float_activations: tuple[str, ...] = ()  # of FLOAT_ACTIVATION_NODES: kept at level 0
    threads: int | None = None  # the runtimes' intra-op threads (genai_config); None: onnxruntime's, one per core

    def __post_init__(self) -> None:
        for part, value, choices in (("lm_head kind", self.lm_head, TABLE_KINDS),
                                     ("embedding kind", self.embedding, EMBEDDING_KINDS),
                                     ("exporter", self.exporter, EXPORTERS),
                                     ("weight format", self.weights, WEIGHT_FORMATS),
                                     ("execution provider", self.provider, PROVIDERS)):
            if value not in choices:
                raise ExportError(f"unknown {part} {value!r}", f"use one of {', '.join(choices)}")
        for node in self.float_activations:
            if node not in FLOAT_ACTIVATION_NODES:
                raise ExportError(f"unknown node kind {node!r} for float activations",
                                  f"use {' or '.join(FLOAT_ACTIVATION_NODES)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level {self.accuracy_level} is not 0–4", "use 4 (int8) or 0 (float)")
        if self.float_activations and self.weights == "qdq":
            raise ExportError("a QDQ graph has no per-node accuracy level (onnxruntime's CPU provider sets one "
                              "for the whole session)", "drop --float-activations, or build MatMulNBits weights")

    @classmethod
    def for_target(cls, target: Target, *, exporter: str | None = None, provider: str | None = None,
                   accuracy_level: int | None = None, weights: str | None = None,
                   float_activations: tuple[str, ...] = (), lm_head: str | None = None,
                   embedding: str = "auto") -> ExportOptions:
        """The options for a build for `target`, where every choice left None (or empty) is the board's:
        its exporter, accuracy level, float-activation nodes and thread count, a CUDA graph when it prefers
        CUDA, and TensorRT's QDQ weights when it prefers TensorRT."""
        first = target.build.providers[:1]
        return cls(exporter=exporter or target.build.exporter,
                   provider=provider or ("cuda" if first == ("CUDA",) else "cpu"),
                   accuracy_level=target.build.accuracy_level if accuracy_level is None else accuracy_level,
                   lm_head=lm_head or cls.lm_head, embedding=embedding,
                   weights=weights or ("qdq" if first == ("TensorRT",) else "matmulnbits"),
                   float_activations=float_activations or target.build.float_activations,
                   threads=target.build.threads)

    def for_model(self, model: nn.Module) -> ExportOptions:
        """These options with an "auto" embedding decided by `model`: a table tied to the head is stored
        as the head is (one table then serves both), an untied one as int4. The lookup reads one row a
        token, so its rounding costs little: on Qwen2.5-Coder-0.5B's untied 151,936 x 896 table int4
        instead of int8 costs 0.08% perplexity on held-out speeches and 0.03% on the Bible, and saves
        70 MB (docs/results/qwen2.5-coder-0.5b/tables.md)."""
        if self.embedding != "auto":
            return self
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        return replace(self, embedding=self.lm_head if tied else "int4")

    @property
    def activation_dtype(self) -> str:
        """The graph's float type: both exporters write float16 graphs for CUDA (accuracy levels are a
        CPU matter: CUDA's MatMulNBits computes in float16)."""
        return "float16" if self.provider == "cuda" else "float32"

    def table_scheme(self, kind: str) -> QuantScheme:
        """How this graph stores a table of `kind` (one of TABLE_SCHEMES): 8-bit tables of a float16
        graph in blocks of 32."""
        scheme = TABLE_SCHEMES[kind]
        return replace(scheme, group_size=32) if scheme.bits == 8 and self.activation_dtype == "float16" else scheme

    @property
    def scale_dtype(self) -> str:
        """The precision the graph keeps its scales in: float16 (the CUDA graph's type; MatMulNBits scales
        in float32 graphs are stored in float16 and cast at load) except for float32 QDQ graphs, whose
        DequantizeLinear takes float32 scales as TensorRT reads them."""
        return "float32" if self.weights == "qdq" and self.provider == "cpu" else "float16"

    def accuracy_level_of(self, node_name: str, bits: int) -> int:
        """The accuracy level of one MatMulNBits node: `accuracy_level` unless `float_activations`
        names its kind."""
        named = {"lm_head": node_name.startswith(LM_HEAD_NODE.rpartition("/")[0] + "/"), "8bit": bits == 8}
        return 0 if any(named[kind] for kind in self.float_activations) else self.accuracy_level
