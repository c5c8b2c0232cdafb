"""Outbound calls (issue 15): the Twilio REST client, numbers and the do-not-call list, pacing,
durable fleet-safe campaigns and their HTTP routes. Every piece takes its dependencies as
arguments (settings, an aiohttp session, a store, a clock, callables): nothing here imports the
app or the call core, which wire it in."""
