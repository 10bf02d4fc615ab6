FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY freshrec freshrec
COPY models models
COPY store store
COPY streams streams
COPY serving serving
COPY evaluation evaluation
COPY bench bench
COPY devenv devenv
RUN pip install --no-cache-dir .
ENTRYPOINT ["freshrec"]
