"""ONNX export: an olive checkpoint → a model folder whose quantized Linears are MatMulNBits nodes.

The modules, one job each; a build calls `steps.export` then `steps.finish`:

    steps     those two calls: run the chosen exporter, then our passes over its graph
    options   ExportOptions: exporter, provider, accuracy levels, table kinds, weight format
    builder   onnxruntime-genai's model builder (the default exporter)
    dynamo    torch.onnx, for architectures the builder lacks
    codes     proof that a graph carries our integer codes, byte for byte
    graph     load for edits, save back, accuracy levels, float16 scales, node replacement
    tables    the lm_head and embedding as our codes (a tied pair stored once)
    offsets   per-group float offsets beside MatMulNBits (a GGUF's blocks with a minimum)
    qdq       DequantizeLinear → MatMul weights for TensorRT
    parity    the graph's logits against the quantized torch model's
"""
