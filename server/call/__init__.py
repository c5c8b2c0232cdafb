"""One phone call: the orchestrator, its model link, playback, endings, plan, conversation,
event stream and response gate; the call's features live in `features/`."""
