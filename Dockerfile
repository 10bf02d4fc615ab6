FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams streams
COPY models models
COPY serving serving
RUN pip install --no-cache-dir .
ENTRYPOINT ["freshrec"]
