import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
import calibration_prompts_draft as C
import heldout_prompts as H
from common import *

t=time.time()
a=self_replies(H.CHAT, H.RAW, 160, "/tmp/br/self_heldout.json")
print("heldout", len(a), sum(x.steps for x in a), time.time()-t, flush=True)
b=self_replies(C.CHAT, C.RAW, 256, "/tmp/br/self_calib.json")
print("calib", len(b), sum(x.steps for x in b), time.time()-t, flush=True)
