# rheads: OpenAI-compatible server with a retrieval-head-aware KV cache.
#   docker build -t rheads .
#   docker run --gpus all -p 8000:8000 -v rheads-cache:/home/rheads/.cache/rheads rheads --model smollm2-135m-instruct
#   docker run -p 8000:8000 rheads --device cpu            # CPU only
# Any PyTorch >= 2.11 CUDA runtime image works; override with --build-arg BASE=... (e.g. a CPU python image).
ARG BASE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 RHEADS_CACHE=/home/rheads/.cache/rheads
RUN useradd --create-home --uid 1000 rheads
WORKDIR /opt/rheads
COPY --chown=rheads:rheads pyproject.toml README.md ./
COPY --chown=rheads:rheads rheads ./rheads
COPY --chown=rheads:rheads server ./server
COPY --chown=rheads:rheads profiles ./profiles
COPY --chown=rheads:rheads scripts ./scripts
# The same install steps CI runs (scripts/install.sh), into the image's Python.
RUN bash scripts/install.sh && chown -R rheads:rheads /opt/rheads

USER rheads
RUN mkdir -p "$RHEADS_CACHE"
VOLUME ["/home/rheads/.cache/rheads"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["rheads", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
