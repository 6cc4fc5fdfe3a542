# The device runtime for Jetson (JetPack 6, L4T R36): the L4T base carries CUDA and cuDNN for an
# onnxruntime-gpu wheel. Context: a bundle built with --wheelhouse for the Jetson target; put the
# onnxruntime-gpu wheel for JetPack 6 / Python 3.10 in its wheels/ to use CUDA (the runtime proves the
# provider with one token at start and falls back to CPU, saying why, when it cannot run).
#   docker build -f docker/runtime-jetson.Dockerfile -t faq-runtime:jetson build/jetson
#   docker run --rm --runtime nvidia -p 8000:8000 -v "$PWD/build/jetson:/bundle:ro" faq-runtime:jetson
ARG L4T=r36.4.0
FROM nvcr.io/nvidia/l4t-jetpack:${L4T}
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY wheels /wheels
RUN python3 -m pip install --no-cache-dir --no-index --find-links /wheels faq-runtime && rm -rf /wheels
EXPOSE 8000
HEALTHCHECK --interval=60s --timeout=30s CMD ["faq-run", "selftest", "/bundle", "--no-hashes", "--tokens", "1"]
ENTRYPOINT ["faq-run"]
CMD ["serve", "/bundle", "--host", "0.0.0.0", "--port", "8000", "--providers", "cuda,cpu"]
