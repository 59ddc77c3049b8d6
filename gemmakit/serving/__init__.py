"""`gemmakit serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.

protocol: the request bodies (validated) and the OpenAI-style error body; engine: the thread
that owns the model and decodes every running request in one batch; batch: the KV cache rows
of that batch; text: token ids to streamed text with stop strings; app: the HTTP routes;
static/: the chat page.
"""
