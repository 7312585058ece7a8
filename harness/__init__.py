"""The template's test and benchmark harness: rendering the template, a PostgreSQL server,
PgBouncer, the rendered service under uvicorn, template repositories for update tests."""
