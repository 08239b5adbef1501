# The cvserve gateway (Ray Serve) for docker-compose. No weights inside: the model repository is
# mounted read-only at /models (see docker-compose.yml). Build context is allow-listed in .dockerignore.
FROM python:3.11-slim

# The gateway only preprocesses on CPU (Triton runs the models), so take torch's CPU wheels: the
# matching `+cpu` builds satisfy pyproject's pins and sort above the CUDA ones from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's injected readiness/liveness probes call it (deploy/k8s/rayservice.yaml).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 cvserve \
 && useradd --system --uid 10001 --gid cvserve --create-home --home-dir /home/cvserve cvserve

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" .

USER cvserve:cvserve
ENV CVSERVE_MODEL_REPOSITORY=/models \
    CVSERVE_HOST=0.0.0.0 \
    CVSERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]
CMD ["python", "-m", "service"]
