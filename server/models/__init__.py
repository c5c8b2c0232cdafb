"""The model boundary: one `ModelSession` interface, one implementation per OpenAI voice API."""
