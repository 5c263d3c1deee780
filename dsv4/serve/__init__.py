"""The HTTP server: OpenAI Chat Completions and Anthropic Messages over one chat backend (`request.py`)."""
