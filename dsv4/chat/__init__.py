"""The DeepSeek-V4 chat format: tokenizer, prompt encoding, and parsers of model output.

    format      the special strings and fixed prompt texts of the format (data, reproduced exactly)
    tokenizer   the official tokenizer (tokenizers library) and an incremental detokenizer
    encoding    OpenAI-shaped messages -> prompt text, byte for byte as the models were trained
    parser      completion text -> reasoning, content and tool calls, all at once (parse_completion)
    streaming   the same as events from chunks of any size (StreamParser); never leaks markup
"""
