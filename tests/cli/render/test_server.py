"""render/server.py: `d3 serve`'s log, a line per request or event, for people (Rich) or machines (JSON)."""

from __future__ import annotations

import datetime
import json

import pytest

from d3cli.cli import render

TIME = "2025-01-02T13:04:05.678+01:00"
REQUEST = {"time": TIME, "event": "request", "method": "POST", "path": "/v1/chat/completions", "status": 200,
           "prompt_tokens": 12, "completion_tokens": 30, "mean_layers": 5.26, "tokens_per_s": 40.04, "time_s": 0.756}


def status_style(text) -> str:
    """The style of the status code's span."""
    return next(str(span.style) for span in text.spans if str(span.style).startswith("bold ")
                and text.plain[span.start:span.end].isdigit())


def test_the_server_starting_and_ready():
    listening = render.server_event_text({"time": TIME, "event": "listening", "url": "http://127.0.0.1:8000",
                                          "model": "tiny"})
    assert listening.plain == "13:04:05 d3 serve · listening on http://127.0.0.1:8000 · loading tiny…"
    ready = render.server_event_text({"time": TIME, "event": "ready", "model": "tiny", "num_layers": 8,
                                      "load_s": 1.234})
    assert ready.plain == "13:04:05 ready: tiny, 8 layers, loaded in 1.2 s"
    assert render.server_event_text({"time": TIME, "event": "stopping"}).plain == "13:04:05 stopping"


def test_a_reply_line_has_its_tokens_depth_rate_and_batch():
    line = render.server_event_text({**REQUEST, "batch": 3})
    assert line.plain == ("13:04:05 POST /v1/chat/completions 200  12+30 tok  5.3 layers  40.0 tok/s  0.76 s  "
                          "in a batch of 3")
    assert status_style(line) == "bold green"


@pytest.mark.parametrize("record, plain, style", [
    ({"method": "GET", "path": "/health", "status": 503, "time_s": 0.001}, "GET  /health 503  0.00 s", "bold yellow"),
    ({"method": "POST", "path": "/v1/completions", "status": 400, "time_s": 0.01,
      "error": "max_tokens must be at least 1"},
     "POST /v1/completions 400  0.01 s  max_tokens must be at least 1", "bold red"),
    ({"method": "POST", "path": "/v1/completions", "status": 499, "time_s": 0.5, "disconnected": True,
      "steps_after_cancel": 1},
     "POST /v1/completions 499  0.50 s  client left, stopped 1 step(s) later", "bold yellow"),
])
def test_a_refused_or_abandoned_request_is_coloured_by_its_status(record, plain, style):
    line = render.server_event_text({"time": TIME, "event": "request", **record})
    assert line.plain == "13:04:05 " + plain and status_style(line) == style


def test_the_json_log_is_one_object_a_line_with_the_time_first(capsys):
    log = render.server_log("json")
    before = datetime.datetime.now().astimezone()
    log({"event": "ready", "model": "tiny", "num_layers": 8, "load_s": 1.0})
    log({"event": "stopping"})
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert [list(record)[:2] for record in records] == [["time", "event"]] * 2
    assert records[0] == {"time": records[0]["time"], "event": "ready", "model": "tiny", "num_layers": 8,
                          "load_s": 1.0}
    stamped = datetime.datetime.fromisoformat(records[0]["time"])
    assert abs((stamped - before).total_seconds()) < 60 and stamped.utcoffset() is not None


def test_the_rich_log_writes_the_same_lines_a_person_reads(capsys):
    log = render.server_log("rich")
    log({**REQUEST, "path": "/v1/" + "x" * 150})  # long lines are not wrapped
    (line,) = capsys.readouterr().err.splitlines()
    assert line[:9].count(":") == 2 and line[9:].startswith("POST /v1/" + "x" * 150 + " 200  12+30 tok")
