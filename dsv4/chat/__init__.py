"""The DeepSeek-V4 chat format: tokenizer, prompt encoding, and parsers of model output.

    format      the special strings and fixed prompt texts of the format (data, reproduced exactly)
    tokenizer   the official tokenizer (tokenizers library) and an incremental detokenizer
    encoding    OpenAI-shaped messages -> prompt text, byte for byte as the models were trained
    events      what the parsers produce: the events, the parsed message, aggregate_events
    arguments   a tool call's arguments JSON from its DSML parameters and the request's tool schemas
    streaming   completion text -> events, from chunks of any size (StreamParser); never leaks markup
    parser      the same all at once (parse_completion): official layouts directly, the rest via streaming
"""
