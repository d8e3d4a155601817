import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
import calibration_prompts_draft as C
from common import *

t=time.time()
b=self_replies(C.CHAT2, C.RAW2, 256, "/tmp/br/self_calib2.json")
print("calib2", len(b), sum(x.steps for x in b), time.time()-t, flush=True)
