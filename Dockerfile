# mmdit-serve container image.
#   docker build -t mmdit-serve .
#   docker run -p 50051:50051 -p 9090:9090 mmdit-serve                      # built-in default model
#   docker run -v /path/to/sd3:/models/sd3:ro -e MMDIT_MODEL=/models/sd3 ... mmdit-serve
# The build stage runs the same install script and build command as the README
# (tests/deploy/dockerfile_test.sh checks it); the runtime stage has only the shared
# libraries the binaries load (tests/deploy/runtime_libraries_test.sh checks that list).

FROM debian:bookworm AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/
RUN ./scripts/install-deps.sh
COPY . .
RUN ./scripts/build.sh \
 && mkdir -p /out/bin \
 && cp build/bin/mmdit build/bin/mmdit-server build/bin/mmdit-client /out/bin/

FROM debian:bookworm-slim AS runtime
# Runtime libraries, one package per line (kept in step with the binaries by the test above).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      libdnnl2 \
      libgomp1 \
      libgrpc++1.51 \
      libgrpc29 \
      libprotobuf32 \
      libspdlog1.10 \
      libfmt9 \
      libabsl20220623 \
      libcpp-httplib0.11 \
      libpng16-16 \
      libbrotli1 \
      ocl-icd-libopencl1 \
      libstdc++6 \
      libgcc-s1 \
      libc6 \
      libssl3 \
      zlib1g \
      libre2-9 \
      libc-ares2 \
      libsystemd0 \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mmdit
COPY --from=build /out/bin/ /usr/local/bin/
# The built-in default model, where the server looks when no model is named: models/digits
# under its working directory (the trained digits model and its text encoder, 2 MB, committed
# in the repo). Mount another model directory (config.json + safetensors) under /models and set
# MMDIT_MODEL to serve it.
COPY models/digits /models/digits
WORKDIR /
ENV MMDIT_HOST=0.0.0.0 \
    MMDIT_PORT=50051 \
    MMDIT_METRICS_PORT=9090
USER 10001
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["mmdit-client", "health", "--target", "127.0.0.1:50051", "--timeout_ms", "2000"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mmdit-server"]
