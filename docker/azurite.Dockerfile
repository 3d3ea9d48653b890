# Azurite, the Azure Storage emulator, from the same npm package the tests use.
FROM node:20-slim
RUN npm install --global azurite@3.37.0
EXPOSE 10000
CMD ["azurite-blob", "--blobHost", "0.0.0.0", "--blobPort", "10000", "--location", "/data", \
     "--disableTelemetry", "--skipApiVersionCheck"]
