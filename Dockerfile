# The lrustream image used by docker-compose.yml for `lrustream worker` and `lrustream trainer`.
#   docker build -t lrustream:local .
# Java is not needed: the containers talk to the compose file's Kafka broker, not to the embedded one.
FROM python:3.11-slim

# CPU wheels of torch (the PyPI default pulls in CUDA libraries, several GB). For a GPU image build with
#   docker build --build-arg PIP_EXTRA_INDEX_URL= .
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .

# Installed in place (-e): /app is the working directory, and the image's code is its source tree. The default
# config ships inside the package (lrustream/kernel/default.yaml), so a plain install would find it too.
RUN pip install -e . \
    && useradd --create-home --uid 10001 lrustream \
    && mkdir -p /app/.lrustream/state /app/.lrustream/models \
    && chown -R lrustream:lrustream /app/.lrustream

# Relative paths in the config (.lrustream/state, .lrustream/models) resolve under /app; the compose file mounts
# volumes there (the directories above give the volumes their owner).
USER lrustream
EXPOSE 6066
CMD ["lrustream", "worker"]
