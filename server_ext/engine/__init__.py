"""The embedded engine behind ``leyline serve``: a Hugging Face model, a KV store in SGLang's
pool layout, a radix tree, sessions, and an OpenAI-compatible HTTP API."""
