# Redis 7 from Debian's redis-server package, for hosts that cannot pull docker-compose.yml's
# default redis:7 (docker/make_local_bases.sh builds it on a debootstrapped Debian bookworm):
#
#   docker build --build-arg BASE=regcl-local/debian:bookworm -t regcl-local/redis:7 - \
#       < docker/redis.Dockerfile
#   REDIS_IMAGE=regcl-local/redis:7 docker compose ...
#
# What the compose file relies on, as with the official image: redis-server and redis-cli on
# PATH, data in /data (a volume), port 6379, not running as root.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data

WORKDIR /data
USER redis
EXPOSE 6379

# Without a config file Redis binds every interface but, protected mode on and no password,
# refuses other hosts; the official image builds with protected mode off. Containers reach it
# over the compose network only (no published port).
CMD ["redis-server", "--protected-mode", "no"]
