# syntax=docker/dockerfile:1
# One image for the three services; compose picks the command per service.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 chat
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER chat
WORKDIR /home/chat
ENV PYTHONUNBUFFERED=1 \
    CHAT_HOST=0.0.0.0 \
    CHAT_HEALTH_HOST=0.0.0.0
EXPOSE 8000
CMD ["chatrelay-gateway"]
