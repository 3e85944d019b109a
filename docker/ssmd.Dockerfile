# The ssmd package with its `ssmd` command; compose.yaml runs `ssmd cdc` and `ssmd cache` from it.
FROM python:3.11-slim-bookworm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ssmd ./ssmd
COPY sim ./sim
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home ssmd

USER ssmd
CMD ["ssmd", "--help"]
