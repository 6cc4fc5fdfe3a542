# The device runtime for 64-bit ARM boards (Raspberry Pi 5, RK3588, any aarch64 Linux), CPU provider.
# Context: a bundle built with --wheelhouse for the board's target (its wheels/ hold faq-runtime,
# onnxruntime, numpy, tokenizers and jinja2 for that Python); PYTHON must be the target's.
#   docker buildx build --platform linux/arm64 -f docker/runtime-arm64.Dockerfile -t faq-runtime build/rk3588
#   docker run --rm -p 8000:8000 -v "$PWD/build/rk3588:/bundle:ro" faq-runtime
ARG PYTHON=3.11
FROM python:${PYTHON}-slim
COPY wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels faq-runtime && rm -rf /wheels
EXPOSE 8000
HEALTHCHECK --interval=60s --timeout=30s CMD ["faq-run", "selftest", "/bundle", "--no-hashes", "--tokens", "1"]
ENTRYPOINT ["faq-run"]
CMD ["serve", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
