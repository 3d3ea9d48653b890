# exportsvc: the API and a worker (`exportsvc serve`), or a worker alone (`exportsvc worker`).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY exportsvc ./exportsvc
COPY destinations ./destinations
COPY datastore ./datastore
RUN pip install --no-cache-dir .
ENV EXPORTSVC_DATA_DIR=/data
VOLUME /data
EXPOSE 8080
CMD ["exportsvc", "serve", "--host", "0.0.0.0", "--port", "8080"]
