# The freshrec image of docker-compose.yml: one image, the command picks the role
# (`worker`, `serve`, `services up`, `replay FILE`, ...).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
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
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 freshrec
# Not root: the processes need to write only FRESHREC_HOME (~/.cache/freshrec: Faust's data
# folder, the compiled kernels).
USER freshrec
WORKDIR /home/freshrec
ENTRYPOINT ["freshrec"]
CMD ["--help"]
