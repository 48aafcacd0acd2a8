# sticky-proxy: Istio's sticky sessions without Istio. docs/deployment.md has the details.
#   docker build -t sticky-proxy .
#   docker run --rm -p 8080:8080 sticky-proxy demo --address 0.0.0.0      # demo pods included
#   docker run -d --stop-timeout 30 -p 8080:8080 -p 15021:15021 -p 15090:15090 \
#       -v "$PWD/my-istio-yaml:/etc/sticky-proxy:ro" sticky-proxy          # your Istio YAML
# podman takes the same commands. The image also runs one demo pod:
#   docker run --rm --entrypoint python sticky-proxy -m proxy.demo --port 8080

# Stage 1: build the wheels; mypyc compiles the request path to C here (setup.py), so this
# stage uses the full image, which has gcc and the headers. They stay in this stage.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy/ proxy/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Stage 2: the runtime image, wheels only, a non-root user.
FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sticky
# The article's Gateway, VirtualService and DestinationRule, without a ServiceEntry: the service
# is found through DNS, as in Kubernetes next to config/k8s/demo-pods.yaml's headless Service.
# Anywhere else it does not resolve, so the proxy logs that its cluster has no endpoint and
# readiness stays 503 until it has one. Mount your own Istio YAML over /etc/sticky-proxy.
COPY config/sticky.yaml /etc/sticky-proxy/
USER 10001
# Traffic on 8080 for the Gateway's port 80, as Istio's ingress gateway does: a non-root process
# may not bind port 80 under podman, --network host or Kubernetes. An environment variable
# rather than a --listen in CMD, so it holds for any command line; --listen overrides it, and
# a config with several Gateway ports needs one address per port here (comma-separated).
ENV STICKY_PROXY_LISTEN=0.0.0.0:8080
# Traffic, readiness (/healthz/ready), Prometheus (/stats/prometheus).
EXPOSE 8080 15021 15090
# Probes /healthz/ready on the port the running proxy's command line names (--readiness-port,
# --ops-address; healthy with --readiness-port off; --readiness-port 0 cannot be probed).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "proxy.healthcheck"]
# exec-form ENTRYPOINT: sticky-proxy is PID 1 and gets SIGTERM itself, so the drain runs:
# readiness 503, --drain-time (5 s) more serving, then up to --drain-deadline (20 s) for
# requests in flight. Give it 30 s before SIGKILL: docker/podman stop's default is 10 s, so run
# with --stop-timeout 30 (or stop with -t 30); compose has stop_grace_period: 30s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sticky-proxy"]
CMD ["run", "/etc/sticky-proxy"]
