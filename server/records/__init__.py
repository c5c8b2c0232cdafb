"""Call records: stored (SQLite or PostgreSQL), served (HTTP API, CLI), sent (call webhook).

`Records` (server.records.service) is the one object the app holds; import it from there, so
that `python -m server calls` can read the database without loading the web app.
"""
