"""Phone bridge: Twilio Media Streams <-> OpenAI Realtime (GA) on one aiohttp application."""

__version__ = "0.1.0"
NAME = "phone-bridge"
