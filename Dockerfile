# Cellpose-web for HuggingFace Spaces (Docker SDK) or any container host.
#   docker build -t cellpose-web .
#   docker run -p 7860:7860 -v cpweb-data:/data cellpose-web
# CPU PyTorch by default; for a GPU host use a CUDA base image and the CUDA wheel of the same torch version.
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
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --chown=user:user requirements.txt ./
RUN pip install -r requirements.txt

COPY --chown=user:user cellpose_web ./cellpose_web
COPY --chown=user:user examples ./examples
COPY --chown=user:user app.py README.md ./

USER user
EXPOSE 7860
VOLUME ["/data"]
CMD ["python", "app.py"]
