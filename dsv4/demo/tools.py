"""The demo's two tools, shared by the corpus that taught them (`dsv4.demo.corpus`) and the chat page that runs
them (`dsv4.serve.ui` serves these definitions and the weather table to the page): `get_weather` answers from a
fixed table, `calculator` evaluates "A op B" (`corpus.calculate`).

A module of data and one pure function, importing nothing of dsv4, so the server may read it (layer 0 of the
package, with `dsv4.demo` itself).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CALCULATOR_TOOL", "TOOLS", "WEATHER", "WEATHER_TOOL", "weather_report"]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with two integers and one of + - * /.",
    "parameters": {"type": "object",
                   "properties": {"expression": {"type": "string", "description": "For example 123 * 456"}},
                   "required": ["expression"]}}}
TOOLS = (WEATHER_TOOL, CALCULATOR_TOOL)

# city -> (temperature in °C, sky): the weather "service" the demo's tool answers from
WEATHER = {
    "Paris": (18, "cloudy"), "London": (14, "rainy"), "Tokyo": (23, "sunny"), "New York": (21, "windy"),
    "Berlin": (16, "cloudy"), "Madrid": (29, "sunny"), "Rome": (26, "sunny"), "Oslo": (7, "snowy"),
    "Cairo": (35, "sunny"), "Sydney": (19, "rainy"), "Toronto": (11, "foggy"), "Mumbai": (31, "humid"),
    "Beijing": (24, "hazy"), "Moscow": (3, "snowy"), "Lima": (17, "foggy"), "Nairobi": (22, "cloudy"),
    "Dublin": (12, "rainy"), "Lisbon": (24, "sunny"), "Seoul": (15, "windy"), "Chicago": (9, "windy"),
    "Vienna": (13, "cloudy"), "Athens": (30, "sunny"), "Hanoi": (33, "stormy"), "Quito": (14, "rainy"),
}


def weather_report(city: str) -> dict[str, Any]:
    """What the demo's `get_weather` tool returns for `city` (an error for a city not in `WEATHER`)."""
    if city not in WEATHER:
        return {"error": f"no weather data for {city}"}
    temp, sky = WEATHER[city]
    return {"city": city, "temperature_c": temp, "condition": sky}
