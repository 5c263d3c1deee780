"""The real Claude Code against `dsv4 serve`: every HTTP status the server returned, and any client error.

    python benchmarks/agent_client.py                      # npm-installs @anthropic-ai/claude-code into a temp dir
    python benchmarks/agent_client.py --claude /tmp/cc/node_modules/.bin/claude --model nano

Starts `dsv4 serve --model MODEL` on a free loopback port (a subprocess; random weights are fine: the point is
the protocol, not the answers), then runs `claude -p` twice in an empty temp directory with
`--output-format stream-json --verbose`: a first prompt, then a second turn with `--continue`. Claude Code is
pointed at the server with ANTHROPIC_BASE_URL and kept off the internet (DISABLE_TELEMETRY,
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC, a private HOME). Its `max_tokens` is set with
CLAUDE_CODE_MAX_OUTPUT_TOKENS to the server's `--max-output-tokens` (Claude Code asks for 32k-64k by default,
past the server's cap, which is a 400 as at Anthropic).

Reports: every request in the server's access log (method, path, status, time), the `dsv4_requests_total`
counters from `/metrics` (protocol x status), each turn's exit status, its `result` event (subtype, is_error,
api_error_status, num_turns) and any error lines, and the server's log lines at WARNING or above. Exit status
0 when no response was a 5xx and every turn completed without an API error (a reply cut at max_tokens, which
random weights always give and Claude Code reports as "exceeded the N output token maximum", counts as
completed: the protocol did its part).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_claude(prefix: str) -> str:
    """`npm install --prefix PREFIX @anthropic-ai/claude-code`; the path of its `claude`."""
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", prefix,
                    "@anthropic-ai/claude-code"], check=True)
    return os.path.join(prefix, "node_modules", ".bin", "claude")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dsv4 serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"dsv4 serve was not ready after {timeout:.0f} s")


def metrics(url: str) -> list[tuple[dict[str, str], float]]:
    """The `dsv4_requests_total` samples: (labels, count)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = []
    for line in text.splitlines():
        m = re.match(r"dsv4_requests_total\{(.*)\}\s+(\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out


def run_turn(claude: str, prompt: str, cwd: str, env: dict[str, str], extra: list[str],
             timeout: float) -> dict:
    """One `claude -p` run: exit status, wall time, the result event and error lines of its stream-json."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run([claude, "-p", prompt, "--output-format", "stream-json", "--verbose", *extra],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(
            errors="replace")
    result, errors, types = None, [], []
    for line in stdout.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        types.append(ev.get("type"))
        if ev.get("type") == "result":
            result = {k: ev.get(k) for k in ("subtype", "is_error", "api_error_status", "num_turns",
                                              "stop_reason", "terminal_reason", "result")}
            if isinstance(result.get("result"), str):
                result["result"] = result["result"][:200]
        if ev.get("type") == "system" and ev.get("subtype") in ("api_error", "error"):
            errors.append(json.dumps(ev)[:300])
        if ev.get("type") == "assistant" and (ev.get("error") or ev.get("isApiErrorMessage")):
            errors.append(json.dumps(ev)[:300])
    # a reply cut at max_tokens is the model's doing (random weights never write EOS), not the protocol's:
    # Claude Code reports it as "API Error: Claude's response exceeded the N output token maximum"
    cut = bool(result and "output token maximum" in str(result.get("result")))
    ok = result is not None and not (result.get("api_error_status")) and (rc == 0 or cut)
    return {"exit": rc, "seconds": round(time.monotonic() - t0, 1), "events": len(types), "result": result,
            "errors": errors, "stderr": stderr.strip()[-1000:], "cut_at_max_tokens": cut, "protocol_ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--claude", help="an installed `claude` to use (default: npm-install into a temp dir)")
    ap.add_argument("--model", default="nano", help="what `dsv4 serve --model` serves (default: nano)")
    ap.add_argument("--max-output-tokens", type=int, default=64)
    ap.add_argument("--turn-timeout", type=float, default=600)
    ap.add_argument("--prompts", nargs=2, default=["list the files here", "and how many are there?"])
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `dsv4 serve` argument (repeatable)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="dsv4-agent-")
    claude = args.claude or install_claude(os.path.join(work, "npm"))
    version = subprocess.run([claude, "--version"], capture_output=True, text=True).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(work, "serve.log")
    cmd = [sys.executable, "-m", "dsv4", "serve", "--model", args.model, "--port", str(port),
           "--max-output-tokens", str(args.max_output_tokens), *args.serve_arg]
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    report: dict = {"claude": version, "server": " ".join(cmd[1:]), "turns": []}
    try:
        wait_ready(url, server, 300)
        project = os.path.join(work, "project")
        home = os.path.join(work, "home")
        os.makedirs(project)
        os.makedirs(home)
        with open(os.path.join(project, "hello.txt"), "w") as f:
            f.write("hello\n")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": home, "ANTHROPIC_BASE_URL": url,
               "ANTHROPIC_API_KEY": "sk-local-test", "DISABLE_TELEMETRY": "1",
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
               "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(args.max_output_tokens)}
        for k, prompt in enumerate(args.prompts):
            extra = ["--allowedTools", "Bash"] + (["--continue"] if k else [])
            turn = run_turn(claude, prompt, project, env, extra, args.turn_timeout)
            turn["prompt"] = prompt
            report["turns"].append(turn)
        report["statuses"] = [{**labels, "count": int(n)} for labels, n in metrics(url)]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    with open(log_path) as f:
        lines = f.read().splitlines()
    access = [m.groups() for line in lines if (m := re.search(r'"(\w+) (\S+)" (\d{3}) ([\d.]+ms)', line))]
    report["access_log"] = [" ".join(a) for a in access]
    counts: dict[str, int] = {}
    for method, path, status, _ in access:
        key = f"{method} {path} {status}"
        counts[key] = counts.get(key, 0) + 1
    report["status_counts"] = counts
    report["server_log_warnings"] = [line for line in lines
                                     if re.search(r"WARNING|ERROR|Traceback|CRITICAL", line)][-40:]
    print(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    bad = [a for a in access if a[2].startswith("5")]
    failed = [t for t in report["turns"] if not t["protocol_ok"]]
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
