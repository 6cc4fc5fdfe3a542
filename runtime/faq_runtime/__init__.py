"""faq-runtime: runs faq-deploy bundles offline with onnxruntime, numpy, tokenizers and jinja2 only."""

__version__ = "0.1.0"
