"""`d3 bench --task speed`: where decoding time goes, and how d3 compares with llama.cpp on the same machine.

    steps.py          step costs T(k), α rows against their ideal, batches, KV-cache bytes, a new process's
                      first token (each side in turns with the one it is compared with)
    side_by_side.py   d3's weight kinds and llama.cpp (llama-cpp-python or llama-bench) decoding in turns; a long
                      prompt's prefill and the decode after it
    report.py         all of it on one loaded model, as one JSON-ready report (the command's one call)
    startup.py        `--task startup`: new processes' first token, cold, warm and through a running server, and
                      the stages of a warm start

The per-step cost fit itself (timing.py) is shared with profile-ppl's recommendation, so it sits one level up.
"""
