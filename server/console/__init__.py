"""The operator console (issue 14): operators' credentials (`auth`), the console's pages and
static files (`routes`, `static/`), and Server-Sent Events (`sse`) for the live routes."""
