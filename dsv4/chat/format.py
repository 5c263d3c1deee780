"""Special strings and fixed prompt texts of the DeepSeek-V4 chat format.

These are data the released models were trained on (`encoding/encoding_dsv4.py` of the release,
`../shared/golden/encoding/templates.md`): the encoder and the parsers must agree on them to the
byte, so they live here once.
"""

from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

# the strings the parsers delete wherever they would reach reasoning, content or arguments: a client
# must never see one, or it would be read back as markup when the conversation is sent again
RESERVED = (EOS, BOS, THINK_START, THINK_END, DSML)

# quick-instruction task tokens (a message's `task` field)
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# DSML tool-call markup
TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_START = f'<{DSML}invoke name="'  # + NAME + '">'
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_START = f'<{DSML}parameter name="'  # + K + '" string="true|false">' + VALUE
PARAMETER_END = f"</{DSML}parameter>"
TOOL_CALLS_SEPARATOR = "\n\n"  # between an assistant's content and its tool-calls block

TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

TOOLS_TEMPLATE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"{TOOL_CALLS_START}" block like the following:\n\n'
    f"{TOOL_CALLS_START}\n"
    f'{INVOKE_START}$TOOL_NAME">\n'
    f'{PARAMETER_START}$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}\n'
    "...\n"
    f"{INVOKE_END}\n"
    f'{INVOKE_START}$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_END}\n"
    f"{TOOL_CALLS_END}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
