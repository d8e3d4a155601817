"""The prototype's two prompt sets, as they now ship in d3cli/profiles/calibration-prompts.json."""
import json
from pathlib import Path

_DATA = json.loads((Path(__file__).parents[4] / "d3cli" / "profiles" / "calibration-prompts.json").read_text())
CHAT, CHAT2 = _DATA["chat"][:48], _DATA["chat"][48:]
RAW, RAW2 = _DATA["raw"][:16], _DATA["raw"][16:]
