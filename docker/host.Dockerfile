# The host toolchain: build, quantize, push. Context: the repository root.
#   docker build -f docker/host.Dockerfile -t faq-deploy .
#   docker run --rm -v "$PWD/build:/work/build" -v faq-cache:/root/.cache faq-deploy build --target jetson
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/*
# The CPU build of torch: PyPI's default wheel for Linux carries CUDA (several GB)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY toolchain /src/toolchain
COPY targets /src/targets
COPY runtime /src/runtime
RUN pip install --no-cache-dir /src/runtime /src
WORKDIR /work
ENTRYPOINT ["faq-deploy"]
CMD ["--help"]
