# stageserve: one image for the router and every stage (compose and k8s pick the command).
#
#   docker build -t stageserve:latest .
#   docker build --build-arg BASE_IMAGE=<another CUDA PyTorch image> -t stageserve:latest .
#
# The base brings CUDA, NCCL and a CUDA build of PyTorch; the build refuses a base whose
# torch is older than the package needs or has no CUDA, instead of swapping in a PyPI torch.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STAGESERVE_LOG_FORMAT=json

RUN python -c "import sys, torch; \
v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
sys.exit(0 if v >= (2, 11) and torch.version.cuda else \
'BASE_IMAGE needs a CUDA build of torch >= 2.11, found ' + torch.__version__)"

WORKDIR /opt/stageserve
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY shared ./shared
COPY stageserve ./stageserve
COPY router ./router
COPY stage_worker ./stage_worker
# Pin torch to the base's own build so pip never replaces it with a PyPI wheel. The [openai]
# extra (FastAPI, uvicorn) is for the `stageserve openai` front, which shares this image.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-pin.txt \
    && python -m pip install --constraint /tmp/torch-pin.txt ".[openai]" \
    && rm /tmp/torch-pin.txt \
    && stageserve --help > /dev/null

# Not root: the model folder is mounted read-only; a writable home holds caches.
RUN useradd --create-home --uid 1000 stageserve
USER stageserve
ENV HOME=/home/stageserve

# API (router), stage control, Prometheus metrics, rendezvous store (router), OpenAI HTTP API.
EXPOSE 50051 50061 8000 29500 8080
CMD ["stageserve", "--help"]
