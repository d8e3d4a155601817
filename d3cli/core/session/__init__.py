"""Settings bound to a loaded model, and what commands build on them:

    front_door.py       open_model(ModelOptions, DecodeSettings) -> Session: load, attach the calibration, plan;
                        the session encodes, streams and decodes (every command's way in)
    settings.py         DecodeSettings: a reply's settings from any source, each range checked once
    plan.py             DecodePlan: settings + a loaded model + its calibration -> the schedule and sampling a reply
                        decodes with (the one place α and min-layers are resolved)
    prompt_batches.py   prompts made ready and batched (`generate --jsonl`)
    conversation.py     a multi-turn chat that reuses its KV cache;  saved_chat.py  chat's /save file
    prefix_cache.py     PrefixCache: a reply's KV cache kept for the next prompt with the same start (d3 serve's
                        prompt cache; the reusable length a chat's turns use too)
"""
