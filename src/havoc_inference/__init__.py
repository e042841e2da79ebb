"""havoc_inference: the engine (static KV cache, continuous batching, sampling) and the OpenAI-compatible server."""
