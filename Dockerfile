# sticky-proxy: Istio's sticky sessions without Istio.
#   docker build -t sticky-proxy .
#   docker run --rm -p 8080:80 -v "$PWD/my-istio-yaml:/etc/sticky-proxy:ro" sticky-proxy
# The same image runs the demo pods: --entrypoint python sticky-proxy -m proxy.demo --port 8080

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
# The article's example is baked in; mount your own Istio YAML over /etc/sticky-proxy.
COPY config/sticky.yaml config/serviceentry.yaml /etc/sticky-proxy/
USER 10001
# Traffic (the Gateway's port 80: Docker lets a non-root process bind it, because containers
# start unprivileged ports at 0), readiness, Prometheus.
EXPOSE 80 15021 15090
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=2)"]
# exec-form ENTRYPOINT: sticky-proxy is PID 1 and gets SIGTERM itself, so the drain runs.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sticky-proxy"]
CMD ["run", "/etc/sticky-proxy"]
