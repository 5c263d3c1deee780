"""`dsv4.runtime`: the typed configs build working services (a preset, the demo model), `dsv4 serve` and
`dsv4 chat` reach every engine option through their flags (the FP8 KV layout over live HTTP, a KV byte budget),
bad settings are exit-2 errors naming the flag, and the layering keeps `dsv4.commands` on top."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import torch
from serve_stubs import live_server

from dsv4.cli import build_parser, main
from dsv4.commands import chat as chat_command
from dsv4.commands.common import byte_size
from dsv4.commands.serve import configs
from dsv4.demo import MODEL_NAME
from dsv4.kv_formats import get_format
from dsv4.runtime import (
    EngineConfig,
    ModelSource,
    OptionError,
    ServerConfig,
    build_serve_context,
    build_service,
    load,
)
from dsv4.serve.app import create_app
from dsv4.serve.context import ServeConfig
from dsv4.serve.request import ChatRequest, Usage

HELLO = [{"role": "user", "content": "Hello"}]


def ask(service, max_tokens: int) -> Usage:
    """One non-think request through the service (the whole path but HTTP); its usage."""
    async def run() -> Usage:
        request = ChatRequest(model=service.model_names[0], messages=HELLO, mode="non-think", max_tokens=max_tokens)
        items = [item async for item in service.generate(request)]
        return items[-1]
    return asyncio.run(run())


# ------------------------------------------------------------------------------------------------ configs
def test_a_preset_builds_a_working_service():
    service = build_service(ModelSource(model="tiny", seed=3), EngineConfig(max_batch=1),
                            ServerConfig(max_output_tokens=8))
    engine = service.engine.engine
    assert service.model_names == ["dsv4-tiny"] and service.max_output_tokens == 8
    assert (engine.model.dtype, engine.model.numerics, engine.kv.kv_format) == (torch.float32, "plain", "model")
    # `dsv4 serve`'s prefix cache: 512 MB, long prompts saved every 128 tokens
    assert engine.prefix is not None and engine.prefix.budget_bytes == 512 << 20 and engine.prefix_interval == 128
    assert service.thinking_sampling == {"temperature": 1.0, "top_p": 1.0}  # V4's T = 1 without a generation_config
    assert 1 <= ask(service, 3).completion_tokens <= 3


def test_the_demo_model_builds_with_serves_defaults():
    loaded = load(ModelSource())
    assert loaded.name == MODEL_NAME and loaded.served_names == [MODEL_NAME]
    assert (loaded.source.numerics, loaded.source.dtype) == ("exact", "float32")  # "auto" settled
    assert loaded.thinking_sampling == {"temperature": 0.0, "top_p": 1.0}  # its generation_config: greedy
    service = build_service(ModelSource(served_names=["a", "b"]), EngineConfig(max_batch=2, max_seq_len=10**9))
    assert service.model_names == ["a", "b"]
    assert service.max_context == loaded.model.args.max_seq_len  # clamped to the model's
    assert service.max_output_tokens == min(4096, service.max_context - 1)
    assert ask(service, 4).completion_tokens >= 1


def test_fp8_settles_auto_to_bfloat16_exact_and_refuses_explicit_conflicts():
    fp8 = EngineConfig(kv_format="fp8")
    assert ModelSource(model="tiny").for_engine(fp8) == ModelSource(model="tiny", dtype="bfloat16", numerics="exact")
    assert ModelSource(dtype="float32").for_engine(EngineConfig()) == ModelSource(dtype="float32")
    with pytest.raises(OptionError) as err:
        ModelSource(dtype="float32").for_engine(fp8)
    assert err.value.options == ("dtype", "kv_format")
    with pytest.raises(OptionError) as err:
        ModelSource(numerics="plain").for_engine(fp8)
    assert err.value.options == ("numerics", "kv_format")


@pytest.mark.parametrize("make, option", [
    (lambda: EngineConfig(kv_format="fp16"), "kv_format"),
    (lambda: EngineConfig(max_batch=0), "max_batch"),
    (lambda: EngineConfig(prefix_cache_bytes=-1), "prefix_cache_bytes"),
    (lambda: ModelSource(dtype="float16"), "dtype"),
    (lambda: ServerConfig(max_queue=-1), "max_queue"),
    (lambda: load(ModelSource(model="/nonexistent/checkpoint")), "model"),
])
def test_bad_settings_raise_option_errors_naming_the_field(make, option):
    with pytest.raises(OptionError) as err:
        make()
    assert err.value.options == (option,) and str(err.value).startswith(f"{option}: ")


# ------------------------------------------------------------------------------------------------ the CLI
def test_byte_sizes():
    assert [byte_size(t) for t in ("4096", "512M", "2G", "1.5GiB", "64KB", "8 MiB")] == [
        4096, 512 * 2**20, 2 * 2**30, 3 * 2**29, 64 * 2**10, 8 * 2**20]


def test_serve_kv_format_fp8_serves_over_http():
    """`dsv4 serve --kv-format fp8` with no other flag: the demo model in bf16 exact numerics, FP8 pages."""
    ctx = build_serve_context(*configs(build_parser().parse_args(["serve", "--kv-format", "fp8",
                                                                  "--max-concurrent", "2"])))
    engine = ctx.backend.engine.engine
    assert (engine.model.dtype, engine.model.numerics) == (torch.bfloat16, "exact")
    assert engine.kv.kv_format == "fp8"
    assert {store.pool.dtype for store in engine.kv.storage.stores.values()} == {torch.uint8}
    body = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 4, "thinking": {"type": "disabled"}}
    with live_server(create_app(ctx)) as url:
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert reply["choices"][0]["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] >= 1
    assert "dsv4_kv_cache_used_bytes" in metrics and "dsv4_completion_tokens_total" in metrics
    # /metrics shows the FP8 page bytes, which are the registry's bytes per row times the rows of a page
    kv, fp8 = engine.kv, get_format("fp8")
    page = sum(kv.page_tokens // engine.model.args.layer_ratio(layer) * fp8.entry_bytes(engine.model.args, kind)
               for layer, kind in kv.storage.stores)
    shown = re.search(r'^dsv4_kv_page_bytes\{format="fp8"\} (\S+)$', metrics, re.M)
    assert shown and float(shown.group(1)) == page == engine.stats().page_bytes > 0
    assert re.search(r'^dsv4_kv_cache_bytes\{format="fp8"\} ', metrics, re.M)


def test_the_kernel_backend_is_an_engine_option(monkeypatch):
    args = build_parser().parse_args(["serve", "--model", "tiny", "--kernel-backend", "reference"])
    assert build_serve_context(*configs(args)).backend.engine.engine.stats().kernel_backend == "reference"
    with pytest.raises(OptionError, match="kernel_backend: 'nope' is not one of"):
        EngineConfig(kernel_backend="nope")
    monkeypatch.setenv("DSV4_KERNEL_BACKEND", "nope")  # the default comes from the environment
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'; available: .*reference"):
        build_serve_context(*configs(build_parser().parse_args(["serve", "--model", "tiny"])))


def test_decode_graphs_are_an_engine_option():
    """`--decode-graphs` reaches the engine (on the CPU its static steps run uncaptured, and answer); it refuses
    speculation, whose every decode step is a speculative one (`test_bad_settings_exit_2_naming_the_flag`)."""
    args = build_parser().parse_args(["serve", "--model", "tiny", "--decode-graphs", "--max-concurrent", "2"])
    source, engine_config, server = configs(args)
    service = build_service(source, engine_config, ServerConfig(max_output_tokens=6))
    assert service.engine.engine.graphs is not None and ask(service, 6).completion_tokens >= 1
    assert service.engine.engine.graphs.steps >= 1
    assert build_service(ModelSource(model="tiny"), EngineConfig(max_batch=1)).engine.engine.graphs is None
    with pytest.raises(OptionError, match="decode_graphs, num_speculative: "):
        EngineConfig(decode_graphs=True, num_speculative=1)


def test_serve_kv_budget_sizes_the_page_pool():
    args = build_parser().parse_args(["serve", "--kv-budget", "8M", "--max-concurrent", "2", "--page-tokens", "256"])
    kv = build_serve_context(*configs(args)).backend.engine.engine.kv
    slot, page = kv.layout.state_bytes + kv.layout.mtp_state_bytes, kv.layout.page_bytes + kv.layout.mtp_page_bytes
    assert kv.page_tokens == 256
    assert kv.num_pages == (8 * 2**20 - 2 * slot) // page and kv.total_bytes <= 8 * 2**20 < kv.total_bytes + page


def test_serve_body_limit_and_signature_key(monkeypatch):
    """`--max-body-mb` and `--signature-key` (or $DSV4_SIGNATURE_KEY) reach the app's ServeConfig; without a key each
    ServeConfig draws a random one (per process in `dsv4 serve`)."""
    monkeypatch.delenv("DSV4_SIGNATURE_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--model", "tiny", "--max-body-mb", "2", "--signature-key", "s3cret"])
    config = build_serve_context(*configs(args)).config
    assert (config.max_body_bytes, config.signature_key) == (2 * 2**20, b"s3cret")
    monkeypatch.setenv("DSV4_SIGNATURE_KEY", "from-env")
    server = configs(build_parser().parse_args(["serve"]))[2]
    assert (server.signature_key, server.max_body_bytes) == ("from-env", 32 * 2**20)
    assert "from-env" not in repr(server)
    monkeypatch.delenv("DSV4_SIGNATURE_KEY")
    assert configs(build_parser().parse_args(["serve"]))[2].signature_key is None
    assert ServeConfig().signature_key != ServeConfig().signature_key and len(ServeConfig().signature_key) == 32
    with pytest.raises(OptionError, match="max_body_bytes: must be >= 1"):
        ServerConfig(max_body_bytes=0)


@pytest.mark.parametrize("argv, flags", [
    (["serve", "--dtype", "float32", "--kv-format", "fp8"], ["--dtype and --kv-format", "float32 with fp8"]),
    (["serve", "--numerics", "plain", "--kv-format", "fp8"], ["--numerics and --kv-format"]),
    (["serve", "--model", "nano", "--page-tokens", "3"], ["--page-tokens: 3 is not a multiple", "(4, 128)"]),
    (["serve", "--max-context", "1"], ["--max-context: must be >= 2"]),
    (["serve", "--decode-graphs", "--num-speculative", "1"], ["--decode-graphs and --num-speculative: "]),
    (["serve", "--model", "nowhere/at-all"], ["--model: 'nowhere/at-all' is not a preset"]),
    (["chat", "--page-tokens", "3", "--prompt", "Hi"], ["--page-tokens: 3 is not a multiple"]),
])
def test_bad_settings_exit_2_naming_the_flag(capsys, argv, flags):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsv4 {argv[0]}: ") and all(f in err for f in flags), err


@pytest.mark.parametrize("argv, flag", [
    (["serve", "--kv-budget", "12X"], "--kv-budget"),
    (["serve", "--kv-budget", "0"], "--kv-budget"),
    (["serve", "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
    (["chat", "--kv-format", "fp16"], "--kv-format"),
    (["serve", "--kernel-backend", "nope"], "--kernel-backend"),
    (["serve", "--max-body-mb", "0"], "--max-body-mb"),
])
def test_unparsable_values_are_argparse_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def test_chat_kv_format_fp8_runs_a_turn(capsys, monkeypatch):
    built = []
    real = chat_command.build_service
    monkeypatch.setattr(chat_command, "build_service", lambda args: built.append(real(args)) or built[-1])
    assert main(["chat", "--kv-format", "fp8", "--mode", "non-think", "--max-tokens", "3", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("> Hi\n") and "[answer]" in out and "tokens (" in out and "tok/s" in out
    kv = built[0].engine.engine.kv
    assert kv.kv_format == "fp8" and kv.max_batch == 1
