# Cellpose-web for HuggingFace Spaces (Docker SDK) or any container host.
#   docker build -t cellpose-web .
#   docker run -p 7860:7860 -v cpweb-data:/data cellpose-web
# Installed from the package metadata (pyproject.toml) with `pip install .`. CPU PyTorch by default;
# for a GPU host use a CUDA base image and drop the CPU index line (PyPI's Linux torch wheel is CUDA).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    CELLPOSE_WEB_HOME=/data \
    HF_HOME=/data/hf \
    HOME=/home/user

# non-root user with uid 1000, as HuggingFace Spaces expects
RUN useradd --create-home --uid 1000 user && mkdir -p /data && chown user:user /data

WORKDIR /home/user/app
# torch first, from the CPU index, so the package's torch==2.13.0 is already satisfied by the CPU build
COPY requirements.txt ./
RUN pip install "$(grep -E '^torch==' requirements.txt)" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml setup.py README.md app.py ./
COPY cellpose_web ./cellpose_web
COPY examples ./examples
# the installed package is what runs, not the copied sources
RUN pip install . && rm -rf build *.egg-info cellpose_web examples

USER user
EXPOSE 7860
VOLUME ["/data"]
CMD ["cellpose-web", "serve"]
