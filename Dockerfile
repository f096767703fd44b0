# One image for the chatbot replicas, the fake providers and the load driver
# (docker-compose.yml picks the command). Build: docker build -t fleetlimit-chatbot .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that editing chatbot/ does not reinstall them. The wheel holds only
# the `limiter` package (pyproject.toml); `chatbot` runs from /app, the working directory,
# which `python -m` puts first on sys.path.
COPY pyproject.toml README.md ./
COPY limiter ./limiter
RUN pip install ".[chatbot]"

COPY chatbot ./chatbot

RUN useradd --create-home --uid 10001 --user-group app
USER app

EXPOSE 8000
CMD ["python", "-m", "chatbot", "serve", "--host", "0.0.0.0", "--port", "8000"]
