"""Tools for trying the bridge without a phone: stand-in, simulator, bench, demo, audio.

Shared pieces: `dial` (place a call as Twilio does), `twiml` (read TwiML), `process` (run a
server as a child process), `inbox` (waits), `loadgen` and `bare_relay` (the bench's load
generator and baseline). The product (everything in `server/` outside this package) never
imports from here: `make lint` enforces it (ruff TID251, configured in pyproject.toml)."""
