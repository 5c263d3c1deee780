"""The HTTP server: OpenAI Chat Completions, OpenAI legacy completions and Anthropic Messages (one module each in
`protocols/`, registered in `app.py`) over one chat backend (`request.py`)."""
