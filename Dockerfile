# syntax=docker/dockerfile:1
# specserve images, one file, three targets:
#   gateway     the gateway alone: the base package only (FastAPI, uvicorn, httpx, pydantic,
#               prometheus-client), no torch, no vLLM
#   engine-cpu  vLLM (vllm-cpu) + the specserve plugin + the gateway; the default target
#   engine-gpu  the same with the CUDA build of vLLM (needs the NVIDIA container toolkit)
# The engine images are installed by scripts/setup.sh, the same script `make setup` runs.
#
#   docker build --target gateway    -t specserve-gateway .
#   docker build --target engine-cpu -t specserve-engine-cpu .
#   docker build --target engine-gpu -t specserve-engine-gpu .
# Every image runs deploy/docker/entrypoint.sh: `serve` (default), `engine` or `gateway`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- common runtime: non-root user, entry point, environment ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HOME=/home/specserve \
    SPECSERVE_PORT=8000 \
    SPECSERVE_ENGINE_PORT=8100 \
    SPECSERVE_HEALTH_URL=http://127.0.0.1:8000/health
RUN groupadd --system --gid 10001 specserve \
    && useradd --system --uid 10001 --gid specserve --create-home --home-dir /home/specserve specserve
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/specserve-entrypoint
WORKDIR /opt/specserve
ENTRYPOINT ["specserve-entrypoint"]
CMD ["serve"]

# --- gateway: base package only ----------------------------------------------------------------
FROM runtime AS gateway
COPY pyproject.toml README* ./
COPY server ./server
COPY plugins ./plugins
RUN pip install --no-cache-dir . \
    && rm -rf /opt/specserve/build \
    && python -c "import specserve.cli, sys; sys.exit('torch' in sys.modules)"
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SPECSERVE_HEALTH_URL'], timeout=4)"]
CMD ["gateway"]

# --- engine images: scripts/setup.sh into /opt/venv ---------------------------------------------
FROM runtime AS engine-base
# libnuma: vLLM's CPU kernels link it; tcmalloc: vLLM's recommended allocator on CPU.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
ENV SPECSERVE_VENV=/opt/venv \
    SPECSERVE_VENV_LINK=0 \
    PATH=/opt/venv/bin:$PATH \
    VLLM_CACHE_ROOT=/home/specserve/.cache/vllm
COPY pyproject.toml README* ./
COPY requirements ./requirements
COPY scripts/setup.sh ./scripts/setup.sh
COPY server ./server
COPY plugins ./plugins

FROM engine-base AS engine-gpu
# Triton (vLLM's GPU kernels) JIT-compiles a small C launcher per kernel signature on first use:
# it needs a C compiler (gcc, or $CC), the C library headers and Python.h (shipped by the official
# python images under /usr/local/include), and finds libcuda.so.1 through `ldconfig -p`, which the
# NVIDIA container toolkit mounts. Without gcc the first kernel fails with "Failed to find C
# compiler". Its cache goes under the writable cache mount.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && test -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
ENV CC=gcc \
    TRITON_CACHE_DIR=/home/specserve/.cache/triton
# pip reads these from the environment: point them at a mirror or an extra wheel index if needed.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
RUN SPECSERVE_FLAVOR=gpu bash scripts/setup.sh \
    && chown -R 10001:10001 /home/specserve
USER 10001:10001
EXPOSE 8000 8100
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SPECSERVE_HEALTH_URL'], timeout=4)"]

# The CPU engine is last so that a plain `docker build .` gives it.
FROM engine-base AS engine-cpu
ENV VLLM_TARGET_DEVICE=cpu \
    VLLM_CPU_KVCACHE_SPACE=1 \
    LD_PRELOAD=libtcmalloc_minimal.so.4
# requirements/cpu.txt pins torch==2.13.0+cpu: give PyTorch's CPU wheel index as
# PIP_EXTRA_INDEX_URL (see docs/deploy.md) unless PIP_INDEX_URL already serves it.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
RUN SPECSERVE_FLAVOR=cpu bash scripts/setup.sh \
    && chown -R 10001:10001 /home/specserve
USER 10001:10001
EXPOSE 8000 8100
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SPECSERVE_HEALTH_URL'], timeout=4)"]
