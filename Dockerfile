# The API service of docker-compose.yml (`docker compose up -d api`).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 \
    POETRY_VIRTUALENVS_IN_PROJECT=true \
    API_HOST=0.0.0.0 \
    API_PORT=8000
WORKDIR /app
RUN pip install "poetry>=2,<3"
COPY pyproject.toml poetry.lock README.md alembic.ini ./
COPY src ./src
RUN poetry install --only main --no-interaction
EXPOSE 8000
# migrate, then serve
CMD ["sh", "-c", "poetry run alembic upgrade head && exec poetry run api"]
