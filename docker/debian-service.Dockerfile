# A service from Debian's own package on the local base: redis-server, prometheus, prometheus-alertmanager,
# prometheus-node-exporter, prometheus-redis-exporter. No registry: only the Debian mirror at build time
# (`appliance bundle` carries the built image to a host with no network at all). Runs as uid 10001; the
# command is set in compose.yaml. TRIM: paths the service never reads (prometheus: 212 MB of raw time zone
# sources that libjs-moment-timezone ships beside the built files its web UI loads).
ARG BASE=llm-appliance/debian-base:bookworm
FROM ${BASE}
ARG PACKAGES
ARG TRIM=""
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PACKAGES} \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* ${TRIM} \
    && groupadd --system --gid 10001 appliance && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home appliance
ENV HOME=/tmp
USER 10001
WORKDIR /data
