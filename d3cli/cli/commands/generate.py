"""`d3 generate`: one prompt (argument or stdin) or a JSONL stream of prompts, decoded with D3.

A thin composition: options -> DecodeSettings -> load() -> engine.generate() -> a renderer or JSON. With --server
(or D3_SERVER) the prompts go to a running `d3 serve` instead (server/client.py) and the same renderers show what
comes back: nothing loads in this process.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from d3cli.base.errors import UserError, check_at_least
from d3cli.cli import render
from d3cli.cli.options import (
    ChatOption,
    DepthArgs,
    ModelArgs,
    SamplingArgs,
    ServerOption,
    SystemOption,
    batch_size_option,
    flag,
    uses_option_groups,
)
from d3cli.core.decode.results import Reply, reply_record
from d3cli.core.session.prompt_batches import (
    PreparedPrompt,
    batches,
    comparison_seed,
    decode,
    plans,
    prepare_prompt,
    warm_up,
)
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import read_stdin_prompt

CompareOption = flag("--compare", "Also decode at full depth and report the measured speedup.")
JsonOption = flag("--json", "Print one JSON object with the reply and its statistics.")
JsonlOption = flag("--jsonl", "Each stdin line is a prompt (text or JSON); print one JSON line each.")
BatchSizeOption = batch_size_option("With --jsonl: decode this many prompts at once.")
SkipBadLinesOption = flag("--skip-bad-lines", "With --jsonl: warn about a malformed line and go on.")
StatsOption = flag("--stats", "When stdout is not a terminal: statistics on stderr.")


@uses_option_groups
def generate(
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="The prompt. Omit it (or give -) to read the prompt from standard input.",
                       show_default=False),
    ] = None,
    model: ModelArgs = ModelArgs(),
    depth: DepthArgs = DepthArgs(),
    sampling: SamplingArgs = SamplingArgs(),
    chat: ChatOption = None,
    system: SystemOption = None,
    compare: CompareOption = False,
    as_json: JsonOption = False,
    jsonl: JsonlOption = False,
    batch_size: BatchSizeOption = 1,
    skip_bad_lines: SkipBadLinesOption = False,
    stats: StatsOption = False,
    server: ServerOption = None,
) -> None:
    """Generate a reply with Position-Aware Depth Decay Decoding.

    Token i of the reply runs floor(L·α^i) of the model's L layers (never fewer than --min-layers).
    On a terminal the text streams with a bar of each token's layer count; piped, only the text is printed.
    """
    settings = DecodeSettings.from_options(**depth.values(), **sampling.values(), chat=chat, system=system)
    if as_json and jsonl:
        raise UserError("--json and --jsonl cannot be combined: --jsonl already prints JSON, one line per prompt")
    check_at_least("--batch-size", batch_size, 1)
    if not jsonl and (batch_size != 1 or skip_bad_lines):
        raise UserError("--batch-size and --skip-bad-lines apply to --jsonl input only")
    if jsonl and prompt is not None:
        raise UserError("--jsonl reads its prompts from standard input; do not pass a PROMPT argument too")

    if not jsonl:
        if prompt is None or prompt == "-":
            if sys.stdin.isatty():
                raise UserError("no prompt: pass one as an argument, or pipe it on standard input")
            prompt = read_stdin_prompt()
        if not prompt.strip():
            raise UserError("the prompt is empty")

    if server:
        run_remote(server, model, settings, prompt, compare=compare, as_json=as_json, jsonl=jsonl,
                   batch_size=batch_size, skip_bad_lines=skip_bad_lines, stats=stats)
        return

    from d3cli.core.session.front_door import open_model

    with render.LoadingBar(model.options().model or "the embedded model") as bar:
        loaded = open_model(model.options(lean=True), settings, progress=bar.progress).loaded
    if jsonl:
        run_jsonl(loaded, settings, compare=compare, batch_size=batch_size, skip_bad_lines=skip_bad_lines)
    else:
        prepared = prepare_prompt(loaded, prompt, settings)
        run_single(loaded, prepared, compare=compare, as_json=as_json, stats=stats)


def run_single(loaded, prepared: PreparedPrompt, compare: bool, as_json: bool, stats: bool) -> None:
    """Decode one prompt; render live on a terminal, else stream plain text (or print JSON)."""
    from d3cli.core.decode.results import GenerationInterrupted

    plan, full_depth = plans(loaded, prepared.settings)
    on_terminal = sys.stdout.isatty() and not as_json
    seed = comparison_seed(prepared.settings) if compare else None
    if compare:
        warm_up(loaded, prepared, full_depth)

    reply: Reply | None = None
    baseline: Reply | None = None
    interrupted = False
    try:
        if on_terminal:
            with render.ReplyView(render.stdout_console(), plan.schedule.num_layers) as view:
                (reply,) = decode(loaded, [prepared], plan, on_event=view.add, seed=seed)
        elif as_json and sys.stdout.isatty():
            with render.Spinner(render.stdout_console(), "generating…") as spinner:
                (reply,) = decode(loaded, [prepared], plan, seed=seed,
                                  on_event=lambda event: spinner.update(f"generating… {event.index + 1} tokens"))
        else:
            (reply,) = decode(loaded, [prepared], plan, on_event=None if as_json else write_text, seed=seed)
        if compare:
            if sys.stdout.isatty():
                with render.Spinner(render.stdout_console(), "decoding at full depth for --compare…"):
                    (baseline,) = decode(loaded, [prepared], full_depth, seed=seed)
            else:
                (baseline,) = decode(loaded, [prepared], full_depth, seed=seed)
    except GenerationInterrupted as stopped:
        interrupted = True
        if reply is None:  # stopped during the D3 run, not during the baseline
            (reply,) = stopped.replies

    record = reply_record(reply, plan, loaded.name, len(prepared.token_ids), baseline, loaded.weights, loaded)
    if as_json:
        render.write_json_line(record)
    elif on_terminal:
        render.print_summary(render.stdout_console(), record)
    else:
        render.write_stdout("" if reply.text.endswith("\n") else "\n")
        if stats:
            render.print_stats(record)
    if interrupted:
        raise typer.Exit(130)


def write_text(event) -> None:
    if event.text:
        render.write_stdout(event.text)


def run_jsonl(loaded, settings: DecodeSettings, compare: bool, batch_size: int, skip_bad_lines: bool) -> None:
    """Each stdin line a prompt; each reply one JSON line, in input order, flushed as it is done.

    On Ctrl-C the replies in flight are still printed, with finish_reason "interrupted".
    """
    from d3cli.cli.jsonl_input import read_requests
    from d3cli.core.decode.results import GenerationInterrupted

    def prepare(request) -> PreparedPrompt:
        return prepare_prompt(loaded, request.prompt, request.settings, request.line, request.request_id)

    requests = read_requests(sys.stdin.buffer, settings, prepare, skip_bad_lines, warn=render.print_warning)
    for number, batch in enumerate(batches(requests, batch_size)):
        plan, full_depth = plans(loaded, batch[0].settings)
        seed = comparison_seed(batch[0].settings) if compare else None
        if compare and number == 0:
            warm_up(loaded, batch[0], full_depth)
        replies: list[Reply] | None = None
        baselines: list[Reply | None] = [None] * len(batch)
        interrupted = False
        try:
            replies = decode(loaded, batch, plan, seed=seed)
            if compare:
                baselines = decode(loaded, batch, full_depth, seed=seed)
        except GenerationInterrupted as stopped:
            interrupted = True
            if replies is None:  # stopped during the D3 run, not during the baseline
                replies = stopped.replies
        for prepared, reply, baseline in zip(batch, replies, baselines):
            render.write_json_line(line_record(loaded, prepared, reply, plan, baseline))
        if interrupted:
            raise typer.Exit(130)


def line_record(loaded, prepared: PreparedPrompt, reply: Reply, plan, baseline: Reply | None) -> dict:
    record = {"line": prepared.line}
    if prepared.request_id is not None:
        record["id"] = prepared.request_id
    record.update(reply_record(reply, plan, loaded.name, len(prepared.token_ids), baseline, loaded.weights, loaded))
    return record


# --- through a running server ------------------------------------------------------------------------------------


def run_remote(url: str, model: ModelArgs, settings: DecodeSettings, prompt: str | None, compare: bool, as_json: bool,
               jsonl: bool, batch_size: int, skip_bad_lines: bool, stats: bool) -> None:
    """--server: the same output as a local run, from a running `d3 serve` of the same model."""
    from d3cli.server.client import RemoteModel, check_local_only

    if compare:
        raise UserError("--compare decodes twice in this process: leave out --server (or run `d3 bench --task speed`)")
    check_local_only(settings)
    remote = RemoteModel.connect(url, model.served_model())
    if jsonl:
        run_jsonl_remote(remote, settings, batch_size, skip_bad_lines)
    else:
        run_single_remote(remote, settings, prompt, as_json, stats)


def run_single_remote(remote, settings: DecodeSettings, prompt: str, as_json: bool, stats: bool) -> None:
    from d3cli.server.client import RemoteRequest, ServerDropped

    request = RemoteRequest(settings, prompt=prompt)
    on_terminal = sys.stdout.isatty() and not as_json
    try:
        if on_terminal:
            with render.ReplyView(render.stdout_console(), remote.num_layers) as view:
                served = remote.stream(request, on_event=view.add)
        else:
            served = remote.stream(request, on_event=None if as_json else write_text)
    except ServerDropped as dropped:
        if as_json:
            render.write_json_line(dropped.partial.record)
        elif not on_terminal:
            render.write_stdout("\n")
        raise
    if as_json:
        render.write_json_line(served.record)
    elif on_terminal:
        render.print_summary(render.stdout_console(), served.record)
    else:
        render.write_stdout("" if served.reply.text.endswith("\n") else "\n")
        if stats:
            render.print_stats(served.record)


def run_jsonl_remote(remote, settings: DecodeSettings, batch_size: int, skip_bad_lines: bool) -> None:
    """Each stdin line a request to the server (`batch_size` of them in flight at once, so that the server may
    decode them together); each reply one JSON line in input order. A reply the server stopped sending is written
    with what arrived (finish_reason "unfinished") before the one-line error."""
    from concurrent.futures import ThreadPoolExecutor

    from d3cli.cli.jsonl_input import read_requests
    from d3cli.server.client import RemoteRequest, ServerDropped, check_local_only

    def prepare(request):
        check_local_only(request.settings)
        if not request.prompt.strip():
            raise UserError("the prompt is empty")
        return request

    def served(request):
        try:
            return remote.stream(RemoteRequest(request.settings, prompt=request.prompt)), None
        except ServerDropped as dropped:
            return dropped.partial, dropped

    requests = read_requests(sys.stdin.buffer, settings, prepare, skip_bad_lines, warn=render.print_warning)
    with ThreadPoolExecutor(max_workers=batch_size) as pool:
        for batch in batches(requests, batch_size):
            for request, (reply, dropped) in zip(batch, pool.map(served, batch)):
                record = {"line": request.line, **({"id": request.request_id} if request.request_id is not None
                                                   else {}), **reply.record}
                render.write_json_line(record)
                if dropped is not None:
                    raise UserError(f"line {request.line}: {dropped}")

